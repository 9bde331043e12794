"""The training loop: `train(cfg) -> TrainResult`; `load_run` reopens a run's checkpoint.

Order of work (every check that can fail does so before anything expensive):
  1. validate the config (keys, types, values; then the mesh against the devices);
  2. output_dir: writable, enough free disk for a checkpoint, and a resumed run's config.json
     equal to this one (or `force`);
  3. data iterator (this process's slice) and the number of steps;
  4. model, base params (preset init, HF dir or `base_params`), LoRA leaves, sharded state —
     or the latest checkpoint of output_dir (resume is automatic);
  5. steps: metrics every train.log_every, eval_fn every train.eval_every, checkpoints every
     train.checkpoint_every and at the end; exports (PEFT adapter / HF dir) at the end.

Faults: SIGTERM saves a checkpoint and returns `exit_code=EXIT_PREEMPTED` (143); a NaN/Inf loss
or gradient skips that update (params unchanged) up to train.max_bad_steps times, then raises
`TrainingError` naming the step (no checkpoint is written past the last good one). A failed
checkpoint write (disk full) raises `TrainingError` naming the last complete checkpoint. Resume
takes the newest checkpoint that restores: damaged newer ones are moved to
output_dir/checkpoints_unreadable/. tests/test_faults.py kills runs at random points (SIGKILL,
mid-save included) and checks the resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from lora_jax import checkpoint as ckpt
from lora_jax import fileio
from lora_jax import config as rc
from lora_jax import sharding
from lora_jax.config import LlamaConfig
from lora_jax.lora import combine_params
from lora_jax.metrics import (MetricsWriter, device_memory_bytes, peak_flops_per_device,
                              train_flops_per_token)
from lora_jax.train_state import TrainState, make_train_step
from lora_jax.trainer import Trainer, model_config_from

log = logging.getLogger("lora_jax.train")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the conventional "terminated, may be requeued" status
__all__ = ["train", "Trainer", "TrainResult", "TrainingError", "EXIT_PREEMPTED",
           "make_train_step", "TrainState", "model_config_from", "load_run", "export"]


class TrainingError(RuntimeError):
  """Training cannot start or continue (bad output dir, config mismatch, NaN loss, ...)."""


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


# --------------------------------------------------------------------------- helpers
def maybe_initialize_distributed(cfg) -> None:
  on_tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  if (cfg.distributed or on_tpu_pod) and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def check_output_dir(path: str, needed_bytes: int) -> None:
  """Raises TrainingError if output_dir cannot be created/written or lacks free space."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{os.getpid()}-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.unlink(probe)
  except OSError as e:
    raise TrainingError(f"output_dir: cannot write to {path!r}: {e}") from None
  free = shutil.disk_usage(path).free
  if needed_bytes > free:
    raise TrainingError(f"output_dir: {path!r} has {free / 2**30:.2f} GiB free but one checkpoint "
                        f"needs ~{needed_bytes / 2**30:.2f} GiB")


def _latest_checkpoint_on_disk(output_dir: str) -> int | None:
  d = os.path.join(output_dir, ckpt.CHECKPOINT_DIR)
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def check_resume_config(cfg, output_dir: str, force: bool) -> None:
  """Refuses to resume a run whose saved config.json differs (listing the keys) unless force."""
  path = os.path.join(output_dir, ckpt.CONFIG_FILE)
  if _latest_checkpoint_on_disk(output_dir) is None or not os.path.exists(path):
    return
  with open(path) as f:
    old = rc.from_dict(json.load(f))
  changes = rc.diff(old, cfg)
  if changes and not force:
    lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in changes)
    raise TrainingError(f"output_dir {output_dir!r} holds a run with a different config; "
                        f"resume with the same config, another output_dir, or --force:\n{lines}")
  if changes:
    log.warning("resuming with %d changed config keys (--force): %s", len(changes),
                ", ".join(k for k, _, _ in changes))


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


def open_tokenizer(cfg, vocab_size: int | None = None):
  """The run's tokenizer; a missing / unreadable file, or a vocab larger than the model's
  (`vocab_size`), is a DataError naming data.tokenizer."""
  from lora_jax.data import DataError, check_vocab, load_tokenizer
  try:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if vocab_size is not None:
      check_vocab(tokenizer, vocab_size)
  except DataError:
    raise
  except (OSError, ValueError) as e:
    msg = str(e).removeprefix("data.tokenizer: ")
    raise DataError("data.tokenizer", msg) from None
  return tokenizer


def _open_data(cfg, model_config: LlamaConfig, data_iter: Any):
  if data_iter is not None:
    return data_iter
  from lora_jax.data import make_batch_iterator
  tokenizer = open_tokenizer(cfg, model_config.vocab_size)
  return make_batch_iterator(cfg.data, tokenizer, seq_len=cfg.train.seq_len,
                             batch_size=cfg.train.global_batch // jax.process_count(),
                             seed=cfg.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())


def _batches_per_epoch(cfg, data_iter) -> int | None:
  needs = cfg.train.epochs > 0 or cfg.data.regime == "ift" or cfg.data.source == "synthetic"
  if not needs or not hasattr(data_iter, "batches_per_epoch"):
    return None
  return int(data_iter.batches_per_epoch)


def total_steps_for(cfg, batches_per_epoch: int | None) -> int:
  t = cfg.train
  if t.steps:
    return int(t.steps)
  if t.epochs:
    if not batches_per_epoch:
      raise rc.ConfigError("train.epochs", "the data has no epoch length (an epoch smaller than "
                           "one global batch, or an unsized stream); use train.steps")
    return max(1, math.ceil(t.epochs * batches_per_epoch))
  return max(1, math.ceil(t.token_budget / (t.global_batch * t.seq_len)))


def _flatten_eval(result: dict) -> dict[str, float]:
  out = {}
  for task, ms in result.items():
    if isinstance(ms, dict):
      out.update({f"{task}/{m}": v for m, v in ms.items() if isinstance(v, (int, float))})
    elif isinstance(ms, (int, float)):
      out[task] = ms
  return out


def _best_key(cfg, flat: dict) -> str | None:
  want = cfg.eval.best_metric
  if want == "auto":
    return next((k for k in flat if k == "loss" or k.endswith("/loss")), None)
  return want if want in flat else None


# --------------------------------------------------------------------------- exports
def export(trainer: Trainer, output_dir: str, mode: str) -> dict[str, str]:
  """Writes export/adapter (PEFT, LoRA) and/or export/hf (HF dir; LoRA merged) per `mode`."""
  lora = trainer.lora_config
  kinds: list[str] = []
  if mode == "auto":
    kinds = ["hf"] if lora is None or lora.init == "pissa" else ["adapter"]
    if lora is not None and not trainer.cfg.model.hf_path:
      kinds.append("native")  # the adapter's base (a preset init) exists nowhere on disk
  elif mode == "all":
    kinds = ["hf", "native"] if lora is None else ["adapter", "hf", "native"]
  elif mode in ("adapter", "hf", "native"):
    kinds = [mode]
  if "adapter" in kinds and lora is None:
    raise rc.ConfigError("train.export", "'adapter' needs a LoRA run (lora.enabled=True)")
  out: dict[str, str] = {}
  root = os.path.join(output_dir, "export")
  base_name = trainer.cfg.model.hf_path or trainer.cfg.model.preset
  if "adapter" in kinds:
    from lora_jax.interop.peft import save_peft
    host = sharding.gather_to_host(trainer.state.trainable)
    tree = combine_params(host, trainer.frozen_shapes)  # kernels only need their shapes
    path = os.path.join(root, "adapter")
    if jax.process_index() == 0:
      save_peft(path, trainer.model_config, lora, tree, base_model_name_or_path=base_name)
    out["adapter"] = path
  if "hf" in kinds:
    from lora_jax.interop.hf import save_hf
    host = sharding.gather_to_host(trainer.params())
    path = os.path.join(root, "hf")
    if jax.process_index() == 0:
      save_hf(path, trainer.model_config, host, lora_config=lora)
    out["hf"] = path
    del host
  if "native" in kinds:
    from lora_jax.interop.native import save_checkpoint
    host = sharding.gather_to_host(trainer.params())
    path = os.path.join(root, "native")
    if jax.process_index() == 0:
      step = int(jax.device_get(trainer.state.step))
      save_checkpoint(path, trainer.model_config, host, lora, metadata={
          "step": step, "tokens": step * trainer.cfg.train.global_batch * trainer.cfg.train.seq_len,
          "base": trainer.base_pointer, "run": os.path.abspath(output_dir)})
    out["native"] = path
    del host
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lora_jax_export")
  return out


def load_run(output_dir: str, step: int | None = None, *, base_params: Any = None,
             force: bool = False) -> tuple[LlamaConfig, Any, dict, dict]:
  """(model_config, lora_config, params, meta) of a training checkpoint in `output_dir` (the
  latest, or `step`): the frozen base is rebuilt from the run's pointer (preset init, HF dir or
  `base_params`) and checked against the saved fingerprint. Loads on the current devices
  whatever mesh the run used."""
  with open(os.path.join(output_dir, ckpt.CONFIG_FILE)) as f:
    cfg = rc.from_dict(json.load(f))
  trainer = Trainer(cfg, total_steps=1, mesh=sharding.make_mesh(None))
  manager = ckpt.make_manager(output_dir, keep=max(cfg.train.keep_checkpoints, 1),
                              async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{output_dir}: no checkpoint {'' if step is None else step} "
                              f"(have {sorted(manager.all_steps())})")
    trainer.init_state(base_params, with_state=False)
    state, _, meta = ckpt.restore(manager, step, trainer.abstract_state)
  finally:
    manager.close()
  saved = meta.get("base", {}).get("fingerprint")
  if saved != trainer.base_pointer["fingerprint"] and not force:
    raise TrainingError(f"{output_dir}: checkpoint {step} was trained on a different base "
                        f"(fingerprint {saved} != {trainer.base_pointer['fingerprint']})")
  trainer.state = state
  return trainer.model_config, trainer.lora_config, trainer.params(), meta


# --------------------------------------------------------------------------- resume
UNREADABLE_DIR = "checkpoints_unreadable"


def _restore_newest(manager, trainer: Trainer, out_dir: str):
  """(step, state, data_state, meta) of the newest checkpoint that restores.

  Orbax only lists committed checkpoints, but a committed one can still be unreadable (a file
  truncated or damaged after the save). Then the one before is tried; once one restores, the
  newer unreadable ones are moved to output_dir/checkpoints_unreadable/ (kept for inspection,
  and out of the way of the run saving those steps again). If none restores, nothing is moved
  and TrainingError lists every failure.
  """
  failed: list[tuple[int, str]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, data_state, meta = ckpt.restore(manager, step, trainer.abstract_state)
    except Exception as e:  # noqa: BLE001 - damage surfaces as tensorstore/JSON/orbax errors
      first = (str(e).strip().splitlines() or [""])[0][:300]
      failed.append((step, f"{type(e).__name__}: {first}"))
      log.warning("checkpoint %d in %s is unreadable (%s); trying the one before", step,
                  manager.directory, failed[-1][1])
      continue
    if failed:
      _set_aside(manager, out_dir, [s for s, _ in failed])
    return step, state, data_state, meta
  lines = "\n".join(f"  step {s}: {why}" for s, why in failed)
  raise TrainingError(
      f"no checkpoint in {manager.directory} can be restored:\n{lines}\n(a config change that "
      "alters the trained state, e.g. lora.rank, cannot resume even with --force); move the "
      "checkpoints away to start over")


def _set_aside(manager, out_dir: str, steps: list[int]) -> None:
  """Moves checkpoint dirs `steps` to output_dir/checkpoints_unreadable/<step>[-<time>]."""
  if jax.process_index() == 0:
    root = os.path.join(out_dir, UNREADABLE_DIR)
    os.makedirs(root, exist_ok=True)
    for s in steps:
      dest = os.path.join(root, str(s))
      if os.path.exists(dest):
        dest += time.strftime("-%Y%m%dT%H%M%S")
      shutil.move(os.path.join(str(manager.directory), str(s)), dest)
      log.warning("moved unreadable checkpoint %d to %s", s, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lora_jax_set_aside_checkpoints")
  manager.reload()


@contextlib.contextmanager
def _save_errors(manager):
  """A failed checkpoint write (disk full, a storage error; an async commit's error surfaces at
  the next save or wait) becomes a TrainingError naming the last complete checkpoint."""
  try:
    yield
  except TrainingError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax re-raises the writer's error as is
    out_dir = os.path.dirname(str(manager.directory))
    raise TrainingError(
        f"saving a checkpoint in {manager.directory} failed ({type(e).__name__}: {e}); the last "
        f"complete checkpoint is {_latest_checkpoint_on_disk(out_dir)}: free space or fix the "
        "output_dir, then run again to resume from it") from e


# --------------------------------------------------------------------------- train
class _Session:
  """One train() call: the step loop with its metrics, evals, checkpoints and fault handling."""

  def __init__(self, cfg, trainer: Trainer, manager, data, writer: MetricsWriter, *,
               total: int, start: int, bad_steps: int, bpe: int | None, eval_fn, best_mode,
               keep_steps: set[int], resumed: bool):
    self.cfg, self.t = cfg, cfg.train
    self.trainer, self.manager, self.data, self.writer = trainer, manager, data, writer
    self.total, self.step, self.bad_steps, self.bpe = total, start, bad_steps, bpe
    self.eval_fn, self.best_mode, self.keep_steps = eval_fn, best_mode, keep_steps
    self.last_saved = start if resumed else -1
    self.tokens_per_step = self.t.global_batch * self.t.seq_len
    self.peak = peak_flops_per_device(override=self.t.peak_flops)
    self.flops_per_token = train_flops_per_token(trainer.model_config, trainer.n_total,
                                                 trainer.n_trainable, self.t.seq_len)
    self._t0: float | None = None  # start of the timing window (None: restart it)
    self._window = 0

  def _position(self, step: int) -> dict:
    return {"step": step, "tokens": step * self.tokens_per_step,
            "epoch": step / self.bpe if self.bpe else None}

  def save(self, step: int, best: float | None = None) -> None:
    meta = {**self._position(step), "bad_steps": self.bad_steps,
            "base": self.trainer.base_pointer, "lora": self.trainer.lora_config is not None}
    with _save_errors(self.manager):
      ckpt.save(self.manager, step, self.trainer.state, self.data.get_state(), meta, best=best)
    self.last_saved = step

  def handle(self, step: int, metrics) -> None:
    """Host side of a finished step: NaN policy, timing, and a metrics record when due."""
    t, m = self.t, jax.device_get(metrics)
    now = time.perf_counter()
    if not bool(m["ok"]):
      self.bad_steps += 1
      if self.bad_steps > t.max_bad_steps:
        raise TrainingError(
            f"step {step}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not "
            f"finite ({self.bad_steps} bad steps > train.max_bad_steps={t.max_bad_steps}); "
            f"stopped without saving; last good checkpoint: {self.manager.latest_step()}")
      log.warning("step %d: non-finite loss/grad; update skipped (%d/%d)", step, self.bad_steps,
                  t.max_bad_steps)
    if self._t0 is None:  # a session's first step includes compilation: not timed
      self._t0, self._window = now, 0
    else:
      self._window += 1
    self.writer.advance()
    if step % t.log_every and step not in (1, self.total):
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
    flat = _flatten_eval(result)
    key = _best_key(self.cfg, flat) if self.best_mode else None
    return float(flat[key]) if key else None

  def run(self) -> bool:
    """Steps until the end or a SIGTERM; returns True when preempted."""
    t, pending, preempted = self.t, None, False
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
        due_eval = bool(self.eval_fn and t.eval_every and (step % t.eval_every == 0
                                                           or step == self.total))
        due_ckpt = bool(t.checkpoint_every and step % t.checkpoint_every == 0
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
      with _save_errors(self.manager):
        self.manager.wait_until_finished()
    if preempted:
      log.warning("preempted: checkpoint of step %d saved in %s; exiting with code %d",
                  self.step, self.manager.directory, EXIT_PREEMPTED)
    return preempted


def train(cfg: ml_collections.ConfigDict, *, eval_fn: Callable[[int, dict], dict] | None = None,
          base_params: Any = None, data_iter: Any = None, force: bool = False) -> TrainResult:
  """Trains (or resumes) the run described by `cfg`; see the module docstring.

  eval_fn(step, params) -> {task: {metric: value}} runs every train.eval_every steps.
  base_params replaces the preset init / HF load. data_iter (process-local batches with
  get_state/set_state) replaces the configured data. force resumes despite config changes.
  """
  rc.validate_config(cfg)
  maybe_initialize_distributed(cfg)
  rc.validate_config(cfg, num_devices=jax.device_count(), num_processes=jax.process_count())
  t, out_dir = cfg.train, os.path.abspath(cfg.output_dir)
  is_main = jax.process_index() == 0
  check_resume_config(cfg, out_dir, force)
  check_output_dir(out_dir, 0)
  data = _open_data(cfg, model_config_from(cfg), data_iter)
  bpe = _batches_per_epoch(cfg, data)
  total = total_steps_for(cfg, bpe)
  trainer = Trainer(cfg, total_steps=total)
  check_output_dir(out_dir, trainer.checkpoint_bytes)
  if is_main:
    fileio.atomic_write_text(os.path.join(out_dir, ckpt.CONFIG_FILE), ckpt.dumps(rc.to_dict(cfg)))

  best_mode = cfg.eval.best_mode if eval_fn is not None and t.eval_every else None
  keep_steps = set(rc.keep_steps(cfg))
  manager = ckpt.make_manager(out_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing,
                              best_mode=best_mode, keep_steps=sorted(keep_steps))
  writer, ok = None, False
  try:
    latest = manager.latest_step()
    trainer.init_state(base_params, with_state=latest is None)
    start, bad_steps = 0, 0
    if latest is not None:
      latest, state, data_state, meta = _restore_newest(manager, trainer, out_dir)
      saved_fp = meta.get("base", {}).get("fingerprint")
      if saved_fp != trainer.base_pointer["fingerprint"] and not force:
        raise TrainingError(f"checkpoint {latest} in {out_dir!r} was trained on a different base "
                            f"(fingerprint {saved_fp} != {trainer.base_pointer['fingerprint']}); "
                            "use the same model.preset/hf_path/seed, or --force")
      trainer.state = state
      data.set_state(data_state)
      start, bad_steps = int(latest), int(meta.get("bad_steps", 0))
      log.info("resumed from %s at step %d", manager.directory, start)
    writer = MetricsWriter(out_dir, enabled=is_main, tensorboard=t.tensorboard,
                           total_steps=total, initial_step=start)
    log.info("training %s: %d steps, %d/%d trainable params, mesh %s, %d devices",
             "LoRA" if trainer.lora_config else "full FT", total, trainer.n_trainable,
             trainer.n_total, dict(trainer.mesh.shape), jax.device_count())
    session = _Session(cfg, trainer, manager, data, writer, total=total, start=start,
                       bad_steps=bad_steps, bpe=bpe, eval_fn=eval_fn, best_mode=best_mode,
                       keep_steps=keep_steps, resumed=latest is not None)
    preempted = session.run()
    exports = {}
    if not preempted and t.export != "none":
      try:
        exports = export(trainer, out_dir, t.export)
      except ImportError as e:
        log.warning("export skipped: %s", e)
    ok = True
  finally:
    try:
      with _save_errors(manager):
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
