"""The training loop: `train(cfg) -> TrainResult`.

Order of work (every check that can fail does so before anything expensive):
  1. validate the config (keys, types, values; then the mesh against the devices), and build
     the eval function from eval.* (unknown tasks, missing eval files fail here);
  2. output_dir: writable, enough free disk for a checkpoint, and a resumed run's config.json
     equal to this one (or `force`);
  3. data iterator (this process's slice) and the number of steps;
  4. model, base params (preset init, HF dir or `base_params`), LoRA leaves, sharded state —
     or the latest checkpoint of output_dir (resume is automatic);
  5. steps: metrics every train.log_every, the eval every train.eval_every, checkpoints every
     train.checkpoint_every and at the end; exports (PEFT adapter / HF dir) at the end.

output_dir may be local or on an object store (gs://): every access goes through lora_jax.fileio
(orbax through etils.epath); see README "Cloud storage (gs://)".

Faults: SIGTERM saves a checkpoint and returns `exit_code=EXIT_PREEMPTED` (143); a NaN/Inf loss
or gradient skips that update (params unchanged) up to train.max_bad_steps times, then raises
`TrainingError` naming the step (no checkpoint is written past the last good one). A failed
checkpoint write (disk full) raises `TrainingError` naming the last complete checkpoint. Resume
takes the newest checkpoint that restores (see resume.py). tests/test_faults.py kills runs at
random points (SIGKILL, mid-save included) and checks the resumed run is bitwise the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lora_jax import checkpoint as ckpt
from lora_jax import fileio
from lora_jax import config as rc
from lora_jax.config import LlamaConfig
from lora_jax.metrics import (MetricsWriter, device_memory_bytes, peak_flops_per_device,
                              train_flops_per_token)
from lora_jax.training import resume
from lora_jax.training.errors import EXIT_PREEMPTED, TrainingError
from lora_jax.training.evaluation import (EvalFn, best_metric_key, eval_fn_from_config,
                                          flatten_eval)
from lora_jax.training.export import export
from lora_jax.training.setup import Trainer, batches_per_epoch, open_data, total_steps_for

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  params: dict  # full params (base + LoRA leaves for LoRA runs), device arrays
  config: ml_collections.ConfigDict
  model_config: LlamaConfig
  lora_config: Any  # LoraConfig or None (full finetuning)
  metrics: list[dict]  # this session's metrics.jsonl records
  output_dir: str
  checkpoint_dir: str
  exports: dict[str, str]  # "adapter" / "hf" -> path
  step: int
  preempted: bool = False
  exit_code: int = 0


def maybe_initialize_distributed(cfg) -> None:
  on_tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  if (cfg.distributed or on_tpu_pod) and not jax.distributed.is_initialized():
    jax.distributed.initialize()


class _StopSignal:
  """Turns SIGTERM into a flag the loop polls (agreed across processes)."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if not self.flag:
      log.warning("received signal %d: saving a checkpoint and exiting", signum)
    self.flag = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.flag))
    return bool(np.max(flags))

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _Session:
  """One train() call: the step loop with its metrics, evals, checkpoints and fault handling."""

  def __init__(self, cfg, trainer: Trainer, manager, data, writer: MetricsWriter, *,
               total: int, start: int, bad_steps: int, batches_per_epoch: int | None,
               eval_fn: EvalFn | None, best_mode: str | None, keep_steps: set[int],
               resumed: bool):
    self.cfg, self.train_cfg = cfg, cfg.train
    self.trainer, self.manager, self.data, self.writer = trainer, manager, data, writer
    self.total, self.step, self.bad_steps = total, start, bad_steps
    self.batches_per_epoch = batches_per_epoch
    self.eval_fn, self.best_mode, self.keep_steps = eval_fn, best_mode, keep_steps
    self.last_saved = start if resumed else -1
    self.tokens_per_step = self.train_cfg.global_batch * self.train_cfg.seq_len
    self.peak = peak_flops_per_device(override=self.train_cfg.peak_flops)
    self.flops_per_token = train_flops_per_token(trainer.model_config, trainer.n_total,
                                                 trainer.n_trainable, self.train_cfg.seq_len)
    self._t0: float | None = None  # start of the timing window (None: restart it)
    self._window = 0

  def _position(self, step: int) -> dict:
    epoch = step / self.batches_per_epoch if self.batches_per_epoch else None
    return {"step": step, "tokens": step * self.tokens_per_step, "epoch": epoch}

  def save(self, step: int, best: float | None = None) -> None:
    meta = {**self._position(step), "bad_steps": self.bad_steps,
            "base": self.trainer.base_provenance, "lora": self.trainer.lora_config is not None}
    with resume.save_errors(self.manager):
      self.writer.sync()  # first: the metrics object then holds every row up to `step`
      ckpt.save(self.manager, step, self.trainer.state, self.data.get_state(), meta, best=best)
    self.last_saved = step

  def handle(self, step: int, metrics) -> None:
    """Host side of a finished step: NaN policy, timing, and a metrics record when due."""
    train_cfg, m = self.train_cfg, jax.device_get(metrics)
    now = time.perf_counter()
    if not bool(m["ok"]):
      self.bad_steps += 1
      if self.bad_steps > train_cfg.max_bad_steps:
        raise TrainingError(
            f"step {step}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not "
            f"finite ({self.bad_steps} bad steps > train.max_bad_steps="
            f"{train_cfg.max_bad_steps}); stopped without saving; last good checkpoint: "
            f"{self.manager.latest_step()}")
      log.warning("step %d: non-finite loss/grad; update skipped (%d/%d)", step, self.bad_steps,
                  train_cfg.max_bad_steps)
    if self._t0 is None:  # a session's first step includes compilation: not timed
      self._t0, self._window = now, 0
    else:
      self._window += 1
    self.writer.advance()
    if step % train_cfg.log_every and step not in (1, self.total):
      return
    dt = (now - self._t0) / self._window if self._window else None
    tr = self.trainer
    rec = {**self._position(step), "loss": float(m["loss"]),
           "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
           "loss_tokens": int(m["loss_tokens"]),
           "tokens_per_s": self.tokens_per_step / dt if dt else None, "step_time_s": dt,
           "mfu": (self.flops_per_token * self.tokens_per_step / dt
                   / (self.peak * jax.device_count()) if dt and self.peak else None),
           "trainable_params": tr.n_trainable, "total_params": tr.n_total}
    mem = device_memory_bytes()
    if mem is not None:
      rec["device_memory_bytes"] = mem
    self.writer.write(rec)
    log.info("step %d loss %.4f grad_norm %.3f lr %.3g%s", step, rec["loss"], rec["grad_norm"],
             rec["lr"], f" {rec['tokens_per_s']:.0f} tok/s" if rec["tokens_per_s"] else "")
    self._t0, self._window = now, 0

  def evaluate(self, step: int) -> float | None:
    """Runs eval_fn, logs it, and returns the value of the best-checkpoint metric if any."""
    result = self.eval_fn(step, self.trainer.params())
    self.writer.write({**self._position(step), "eval": result})
    self._t0 = None  # eval time is not step time
    flat = flatten_eval(result)
    key = best_metric_key(self.cfg, flat) if self.best_mode else None
    return float(flat[key]) if key else None

  def run(self) -> bool:
    """Steps until the end or a SIGTERM; returns True when preempted."""
    train_cfg, pending, preempted = self.train_cfg, None, False
    with _StopSignal() as stop:
      while self.step < self.total:
        if stop.should_stop():
          preempted = True
          break
        try:
          host_batch = next(self.data)
        except StopIteration:
          raise TrainingError(f"data ran out at step {self.step} of {self.total}") from None
        metrics = self.trainer.step(host_batch)
        self.step += 1
        step = self.step
        if pending is not None:  # the previous step's metrics, read while this step runs
          self.handle(*pending)
        pending = (step, metrics)
        due_eval = bool(self.eval_fn and train_cfg.eval_every and (
            step % train_cfg.eval_every == 0 or step == self.total))
        due_ckpt = bool(train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0
                        or step in self.keep_steps)
        if due_eval or due_ckpt or step == self.total:
          self.handle(*pending)
          pending = None
        best = self.evaluate(step) if due_eval else None
        if due_ckpt or best is not None:
          self.save(step, best)
      if pending is not None:
        self.handle(*pending)
      if self.last_saved != self.step:
        self.save(self.step)
      with resume.save_errors(self.manager):
        self.manager.wait_until_finished()
    if preempted:
      log.warning("preempted: checkpoint of step %d saved in %s; exiting with code %d",
                  self.step, self.manager.directory, EXIT_PREEMPTED)
    return preempted


def train(cfg: ml_collections.ConfigDict, *, eval_fn: EvalFn | None = None,
          base_params: Any = None, data_iter: Any = None, force: bool = False) -> TrainResult:
  """Trains (or resumes) the run described by `cfg`; see the module docstring.

  eval_fn(step, params) -> {task: {metric: value}} runs every train.eval_every steps; without
  it, eval.tasks (if set) are run (lora_jax.training.evaluation), as `lora-jax train` does.
  base_params replaces the preset init / HF load. data_iter (process-local batches with
  get_state/set_state) replaces the configured data. force resumes despite config changes.
  """
  rc.validate_config(cfg)
  maybe_initialize_distributed(cfg)
  rc.validate_config(cfg, num_devices=jax.device_count(), num_processes=jax.process_count())
  if eval_fn is None:
    eval_fn = eval_fn_from_config(cfg)
  train_cfg, out_dir = cfg.train, fileio.abspath(cfg.output_dir)
  is_main = jax.process_index() == 0
  resume.check_resume_config(cfg, out_dir, force)
  resume.check_output_dir(out_dir, 0)
  data = data_iter if data_iter is not None else open_data(cfg, rc.model_config_from(cfg))
  epoch_batches = batches_per_epoch(cfg, data)
  total = total_steps_for(cfg, epoch_batches)
  trainer = Trainer(cfg, total_steps=total)
  resume.check_output_dir(out_dir, trainer.checkpoint_bytes)
  if is_main:
    fileio.atomic_write_text(fileio.join(out_dir, ckpt.CONFIG_FILE), ckpt.dumps(rc.to_dict(cfg)))

  best_mode = cfg.eval.best_mode if eval_fn is not None and train_cfg.eval_every else None
  keep_steps = set(rc.keep_steps(cfg))
  manager = ckpt.make_manager(out_dir, keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpointing, best_mode=best_mode,
                              keep_steps=sorted(keep_steps))
  writer, ok = None, False
  try:
    latest = manager.latest_step()
    trainer.init_state(base_params, with_state=latest is None)
    start, bad_steps = 0, 0
    if latest is not None:
      latest, state, data_state, meta = resume.restore_newest(manager, trainer.abstract_state,
                                                              out_dir)
      resume.check_base(meta, trainer.base_provenance, latest, out_dir, force)
      trainer.state = state
      data.set_state(data_state)
      start, bad_steps = int(latest), int(meta.get("bad_steps", 0))
      log.info("resumed from %s at step %d", manager.directory, start)
    writer = MetricsWriter(out_dir, enabled=is_main, tensorboard=train_cfg.tensorboard,
                           total_steps=total, initial_step=start)
    log.info("training %s: %d steps, %d/%d trainable params, mesh %s, %d devices",
             "LoRA" if trainer.lora_config else "full FT", total, trainer.n_trainable,
             trainer.n_total, dict(trainer.mesh.shape), jax.device_count())
    session = _Session(cfg, trainer, manager, data, writer, total=total, start=start,
                       bad_steps=bad_steps, batches_per_epoch=epoch_batches, eval_fn=eval_fn,
                       best_mode=best_mode, keep_steps=keep_steps, resumed=latest is not None)
    preempted = session.run()
    exports = {}
    if not preempted and train_cfg.export != "none":
      try:
        exports = export(trainer, out_dir, train_cfg.export)
      except ImportError as e:
        log.warning("export skipped: %s", e)
    ok = True
  finally:
    try:
      with resume.save_errors(manager):
        manager.close()  # waits for an async save in flight (of a good step)
    except TrainingError as e:
      if ok:
        raise
      log.error("%s", e)  # do not hide the error that stopped training
    if writer is not None:
      writer.close()
  return TrainResult(params=trainer.params(), config=cfg, model_config=trainer.model_config,
                     lora_config=trainer.lora_config, metrics=writer.history, output_dir=out_dir,
                     checkpoint_dir=str(manager.directory), exports=exports, step=session.step,
                     preempted=preempted, exit_code=EXIT_PREEMPTED if preempted else 0)
