"""The demo's phases, all through the library: pretrain -> finetune (full / LoRA) with evals ->
spectral analysis -> results.json + report + verdict.

  1. base      pretrain the tiny Llama on the source domain (`train.train`, full FT from the
               preset's seeded init); reused from `<out>/base/` when its settings match.
  2. finetune  one `train.train` run per method on the target domain from the base params, with
               `DemoEvaluator` as the eval callback every `eval_every` steps.
  3. evaluate  target accuracy (learning) and source accuracy (forgetting) at each checkpoint.
  4. analyze   `analysis.analyze(base, finetuned)`: rank@90% and spectra of every dW.
  5. report    results.json, report.md and PNGs (`demo.report`), and the verdict (`demo.verdict`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import resource
import time
from typing import Any, Callable

import jax
import numpy as np

from lora_jax import config as rc
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.demo.data import ExampleBatches, encode_example
from lora_jax.demo.domains import SourceDomain, TargetDomain
from lora_jax.demo.evaluate import DemoEvaluator

log = logging.getLogger("lora_jax.demo")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One finetuning run: full FT (rank 0) or LoRA of `rank` on `targets`; full FT may carry a
  regularizer (decoupled weight decay, attention dropout)."""
  rank: int = 0
  targets: str = "all"
  lr: float = 0.0
  weight_decay: float = 0.0
  attention_dropout: float = 0.0

  @property
  def is_lora(self) -> bool:
    return self.rank > 0

  @property
  def is_regularized(self) -> bool:
    return self.weight_decay > 0 or self.attention_dropout > 0

  @property
  def name(self) -> str:
    kind = f"lora_r{self.rank}_{self.targets}" if self.is_lora else "full"
    reg = (f"_wd{self.weight_decay:g}" if self.weight_decay else "") + (
        f"_adrop{self.attention_dropout:g}" if self.attention_dropout else "")
    return f"{kind}_lr{self.lr:g}{reg}"

  @property
  def label(self) -> str:
    if not self.is_lora:
      reg = (f" + weight decay {self.weight_decay:.2g}" if self.weight_decay else "") + (
          f" + attn dropout {self.attention_dropout:g}" if self.attention_dropout else "")
      return "full FT" + reg
    return f"LoRA r={self.rank}" + ("" if self.targets == "all" else f" ({self.targets})")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  seed: int = 0
  quick: bool = False
  # model (a "tiny" preset override): width, depth, heads, MLP width
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  intermediate_size: int = 344
  seq_len: int = 64  # pretraining rows; finetuning rows are cut to `Demo.finetune_seq_len`
  batch_rows: int = 24  # rows per step (target: 4 packed samples each)
  optimizer: str = "adamw"  # finetuning (the base is always pretrained with AdamW)
  # phase 1
  source_train: int = 20000
  pretrain_steps: int = 500
  pretrain_lr: float = 1e-3
  # phase 2
  target_train: int = 8000
  target_digits: int = 3
  target_per_position: bool = True
  finetune_steps: int = 250
  eval_every: int = 50
  # Peak LRs tried per method; the one with the lowest final target validation loss is kept
  # (the paper's protocol). LoRA's grid runs at `grid_rank` on all modules; the other LoRA runs
  # use the LR it selects.
  lrs_full: tuple[float, ...] = (3e-4, 1e-3)
  lrs_lora: tuple[float, ...] = (1e-3, 3e-3)
  grid_rank: int = 16
  ranks: tuple[int, ...] = (1, 4, 16)
  # extra LoRA runs at `grid_rank` on a subset of modules (the paper's ablation, not one of the
  # five claims): off by default, `--target-sets attention,mlp` adds them
  target_sets: tuple[str, ...] = ()
  # Regularized full FT at the selected full-FT LR (claim d, the paper's Fig. 4). Weight decay:
  # the paper's values rescaled to equal total decay per epoch (see `weight_decays`); attention
  # dropout: the paper's rates (a probability per attention weight, scale-free).
  paper_weight_decays: tuple[float, ...] = (5e-5, 1e-4)
  paper_steps_per_epoch: int = 193  # code IFT: Magicoder, global batch 192 x 4096, packed
  attention_dropouts: tuple[float, ...] = (0.05, 0.1)
  # phase 3
  eval_source: int = 300
  eval_target: int = 300
  # Diversity (claim e, the paper's Fig. 5): n samples per held-out target prompt through
  # `generate` at the paper's temperature / top-p, from the base, full FT and LoRA.
  div_prompts: int = 100
  div_samples: int = 50
  div_temperature: float = 0.2
  div_top_p: float = 0.95

  def grid(self) -> tuple[list[RunSpec], list[RunSpec]]:
    """(full-FT LR grid, LoRA LR grid)."""
    return ([RunSpec(0, "all", lr) for lr in self.lrs_full],
            [RunSpec(self.grid_rank, "all", lr) for lr in self.lrs_lora])

  def lora_runs(self, lr: float) -> list[RunSpec]:
    """The LoRA runs beyond the grid, at the selected LR."""
    out = [RunSpec(r, "all", lr) for r in self.ranks if r != self.grid_rank]
    return out + [RunSpec(self.grid_rank, t, lr) for t in self.target_sets]

  def weight_decays(self, steps_per_epoch: int) -> tuple[float, ...]:
    """The demo's equivalents of the paper's weight decays: equal total decay per epoch.

    Decoupled decay shrinks every weight by wd * lr(t) / peak_lr per step, so over a run the
    log-shrinkage is wd * sum_t factor(t). Both runs use the same schedule shape (cosine, 10%
    warmup, to 1%), so equal shrinkage at equal epochs means wd_demo * steps_per_epoch_demo =
    wd_paper * 193 (code IFT's steps per epoch). Two significant digits."""
    scale = self.paper_steps_per_epoch / max(int(steps_per_epoch), 1)
    return tuple(float(f"{w * scale:.2g}") for w in self.paper_weight_decays)

  def regularizer_runs(self, lr: float, steps_per_epoch: int) -> list[RunSpec]:
    """Full FT at the selected LR with each weight decay and each attention dropout rate."""
    return ([RunSpec(0, "all", lr, weight_decay=w) for w in self.weight_decays(steps_per_epoch)]
            + [RunSpec(0, "all", lr, attention_dropout=p) for p in self.attention_dropouts])

  def base_key(self) -> str:
    """Hash of everything the base model depends on (for reusing `<out>/base/`)."""
    keys = ("seed", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len",
            "batch_rows", "source_train", "pretrain_steps", "pretrain_lr")
    blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


QUICK = dict(quick=True, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176,
             batch_rows=16, source_train=3000, pretrain_steps=150, target_train=2000,
             finetune_steps=40, eval_every=20, lrs_full=(1e-3,), lrs_lora=(3e-3,), grid_rank=8,
             ranks=(1, 8), target_sets=(), eval_source=64, eval_target=64,
             paper_weight_decays=(1e-4,), attention_dropouts=(0.1,), div_prompts=16,
             div_samples=8)


def settings_for(quick: bool = False, **overrides) -> DemoSettings:
  base = dict(QUICK) if quick else {}
  base.update({k: v for k, v in overrides.items() if v is not None})
  return DemoSettings(**base)


# --------------------------------------------------------------------------- helpers
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_s = [0.0]  # wall seconds spent tracing, lowering and compiling, process-wide


def _on_duration(event: str, secs: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_s[0] += secs


jax.monitoring.register_event_duration_secs_listener(_on_duration)


class Clock:
  """Wall and process-CPU seconds since creation (CPU time includes every thread), and the wall
  seconds of that spent compiling (jax's compile events)."""

  def __init__(self):
    self.wall0, self.cpu0, self.compile0 = time.perf_counter(), _cpu(), _compile_s[0]

  def read(self) -> dict:
    return {"wall_s": round(time.perf_counter() - self.wall0, 2),
            "cpu_s": round(_cpu() - self.cpu0, 2),
            "compile_s": round(_compile_s[0] - self.compile0, 2)}


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_config(s: DemoSettings, out_dir: str, *, steps: int, lr: float, spec: RunSpec | None,
               eval_every: int = 0, optimizer: str | None = None, seq_len: int | None = None):
  """A `run_config` for one phase: the tiny preset resized, IFT, the paper's cosine recipe."""
  c = rc.default_config()
  c.seed = s.seed
  c.output_dir = out_dir
  c.model.preset = "tiny"
  c.model.overrides = {"hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers,
                       "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_heads,
                       "intermediate_size": s.intermediate_size,
                       "max_position_embeddings": s.seq_len}
  c.model.attention_dropout = spec.attention_dropout if spec else 0.0
  c.optimizer.weight_decay = spec.weight_decay if spec else 0.0
  c.lora.enabled = bool(spec and spec.is_lora)
  if c.lora.enabled:
    c.lora.rank = spec.rank
    c.lora.alpha = 0.0  # 2 * rank, as the paper
    c.lora.dropout = 0.0
    c.lora.targets = spec.targets
  c.optimizer.name = optimizer or s.optimizer
  c.optimizer.lr = lr
  c.schedule.name = "cosine_with_warmup"
  c.schedule.warmup_fraction = 0.1
  c.schedule.alpha_f = 0.01
  c.train.steps = steps
  c.train.global_batch = s.batch_rows
  c.train.seq_len = seq_len or s.seq_len
  c.train.log_every = max(1, steps // 10)
  c.train.eval_every = eval_every
  # no "best checkpoint" to keep (a save after every eval): the demo keeps only the final state
  c.eval.best_metric = "none"
  c.train.keep_checkpoints = 1
  c.train.async_checkpointing = False
  c.train.export = "none"
  c.train.tensorboard = False
  c.data.regime = "ift"
  c.data.source = "synthetic"  # unused: batches come from `data_iter`
  return c


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


# --------------------------------------------------------------------------- phases
class Demo:
  """Holds the domains, data and evaluator; `run()` executes every phase."""

  def __init__(self, settings: DemoSettings, out_dir: str, echo: Callable[[str], None] = print):
    s = self.s = settings
    self.out = os.path.abspath(out_dir)
    self.echo = echo
    self.tokenizer = ByteTokenizer()
    self.source = SourceDomain(s.seed)
    self.target = TargetDomain(s.seed, n_digits=s.target_digits,
                               per_position=s.target_per_position)
    self.source_train = self.source.train_set(s.source_train, s.seed)
    self.target_train = self.target.train_set(s.target_train, s.seed)
    self.source_eval = self.source.choice_eval(
        s.eval_source, s.seed, exclude=[e.prompt for e in self.source_train])
    self.target_eval = self.target.generation_eval(
        s.eval_target, s.seed, exclude=[e.prompt for e in self.target_train])
    self.model_config = None
    self.evaluator: DemoEvaluator | None = None
    self.timings: dict[str, dict] = {}
    self._batch_cache: dict = {}

  @functools.cached_property
  def finetune_seq_len(self) -> int:
    """Finetuning row length: every target sample encodes to the same number of tokens (BOS +
    `a*b=` + answer + EOS), so rows of a whole number of samples carry no padding. Packing
    ("whole" mode) puts the same samples in the same rows either way, so this only drops the
    padding of `seq_len`-token rows (64 -> 52 tokens: 19% fewer tokens per step, same batches)."""
    lengths = {len(ids) for ids, _ in (encode_example(e, self.tokenizer)
                                       for e in self.target_train)}
    if len(lengths) != 1:
      return self.s.seq_len
    n = lengths.pop()
    return max(n, (self.s.seq_len // n) * n)

  def batches(self, examples, stream: int, seq_len: int | None = None) -> ExampleBatches:
    """Batches of `examples` (stream 1: source, 2: target); every run of a stream reads the same
    batches, so their encoding and packing are shared (`ExampleBatches(cache=...)`)."""
    seq_len = seq_len or self.s.seq_len
    cache = self._batch_cache.setdefault((stream, seq_len), {})
    return ExampleBatches(examples, self.tokenizer, seq_len=seq_len,
                          batch_size=self.s.batch_rows, seed=self.s.seed * 1000 + stream,
                          cache=cache)

  # -- phase 1
  def pretrain(self) -> Any:
    from lora_jax.training import train
    s, clock = self.s, Clock()
    base_dir = os.path.join(self.out, "base")
    cache = os.path.join(base_dir, "base_params.pkl")
    key = s.base_key()
    cfg = run_config(s, base_dir, steps=s.pretrain_steps, lr=s.pretrain_lr, spec=None,
                     optimizer="adamw")
    self.model_config = rc.model_config_from(cfg)
    self.evaluator = DemoEvaluator(self.model_config, self.tokenizer, self.source_eval,
                                   self.target_eval)
    params = None
    if os.path.exists(cache):
      with open(cache, "rb") as f:
        saved = pickle.load(f)
      if saved.get("key") == key:
        params, reused = saved["params"], True
        self.echo(f"[1/5] base: reusing {cache} (settings hash {key})")
    if params is None:
      reused = False
      if os.path.isdir(base_dir):
        import shutil
        shutil.rmtree(base_dir)  # stale base of other settings: retrain from scratch
      self.echo(f"[1/5] base: pretraining on the source domain ({s.pretrain_steps} steps, "
                f"{len(self.source_train)} samples: {self.source.describe()})")
      result = train(cfg, data_iter=self.batches(self.source_train, 1))
      _stop_if_preempted(result)
      params = _host(result.params)
      os.makedirs(base_dir, exist_ok=True)
      with open(cache + ".tmp", "wb") as f:
        pickle.dump({"key": key, "params": params}, f)
      os.replace(cache + ".tmp", cache)
    ev = self.evaluator(params)
    self.timings["base"] = {**clock.read(), "reused": reused}
    self.echo(f"      base: source acc {ev['source']['acc']:.3f}, target acc "
              f"{ev['target']['acc']:.3f}  ({_fmt_time(self.timings['base'])})")
    self.base_eval = ev
    return params

  # -- phases 2 + 3
  def finetune(self, spec: RunSpec, base_params: Any, index: int, total: int,
               grid: bool = False) -> dict:
    from lora_jax.training import train
    s, clock = self.s, Clock()
    run_dir = os.path.join(self.out, "runs", spec.name)
    if os.path.isdir(run_dir):
      import shutil
      shutil.rmtree(run_dir)  # a demo run always starts fresh (no resume of old checkpoints)
    cfg = run_config(s, run_dir, steps=s.finetune_steps, lr=spec.lr, spec=spec,
                     eval_every=s.eval_every, seq_len=self.finetune_seq_len)
    lora = rc.lora_config(cfg)
    curve = [_point(0, self.base_eval)]

    eval_clock = {"cpu_s": 0.0, "wall_s": 0.0}

    def eval_fn(step, params):
      c = Clock()
      ev = self.evaluator(params, lora)
      for k, v in c.read().items():
        if k in eval_clock:
          eval_clock[k] += v
      curve.append(_point(step, ev))
      return {"target": {"acc": ev["target"]["acc"], "loss": ev["target"]["loss"]},
              "source": {"acc": ev["source"]["acc"]}}

    self.echo(f"[2/5] finetune {index}/{total}: {spec.label}, lr {spec.lr:g}"
              f"{' (LR grid)' if grid else ''}")
    result = train(cfg, eval_fn=eval_fn, base_params=base_params,
                   data_iter=self.batches(self.target_train, 2, self.finetune_seq_len))
    _stop_if_preempted(result)
    params = _host(result.params)
    losses = [(m["step"], m["loss"]) for m in result.metrics if "loss" in m]
    t = clock.read()
    t["eval_wall_s"], t["eval_cpu_s"] = (round(eval_clock["wall_s"], 2),
                                         round(eval_clock["cpu_s"], 2))
    end = curve[-1]
    self.echo(f"      {spec.label}: target acc {end['target_acc']:.3f} (loss "
              f"{end['target_loss']:.3f}), source acc {end['source_acc']:.3f}  ({_fmt_time(t)})")
    return {"spec": spec, "lora": lora, "params": params, "curve": curve, "loss": losses,
            "time": t}

  # -- diversity (claim e)
  def diversity(self, base_params: Any, runs: list[dict]) -> dict:
    """Samples `div_samples` completions of the first `div_prompts` held-out target prompts
    from the base and each run, and counts unique strings (`evaluate.diversity_counts`)."""
    from lora_jax.demo.evaluate import diversity_counts
    s = self.s
    examples = self.target_eval[:s.div_prompts]
    self.echo(f"[3/5] diversity: {s.div_samples} samples per prompt of {len(examples)} target "
              f"prompts at T={s.div_temperature:g}, top-p {s.div_top_p:g}, from the base and "
              f"{len(runs)} runs")
    models = {}
    for name, label, rank, params, lora in (
        [("base", "base", -1, base_params, None)]
        + [(r["spec"].name, r["spec"].label, r["spec"].rank, r["params"], r["lora"])
           for r in runs]):
      samples = self.evaluator.sample(params, lora, examples, n=s.div_samples,
                                      temperature=s.div_temperature, top_p=s.div_top_p,
                                      seed=s.seed)
      models[name] = {"label": label, "rank": rank, **diversity_counts(examples, samples),
                      "examples": [list(x[:5]) for x in samples[:3]]}
      m = models[name]
      self.echo(f"      {label}: {m['unique_mean']:.2f} unique strings per prompt "
                f"({m['unique_correct_total']} correct + {m['unique_incorrect_total']} incorrect "
                f"unique in all; {m['correct_fraction']:.2f} of samples correct)")
    return {"n_prompts": len(examples), "n_samples": s.div_samples,
            "temperature": s.div_temperature, "top_p": s.div_top_p, "models": models}

  def regularizer_info(self, steps_per_epoch: int, lr: float) -> dict:
    """The regularizer strengths and where they come from (for the report)."""
    from lora_jax.optim import schedule_values
    s = self.s
    cfg = run_config(s, self.out, steps=s.finetune_steps, lr=lr, spec=None)
    factor_sum = float(sum(schedule_values(cfg.schedule, s.finetune_steps,
                                           range(s.finetune_steps))))
    wds = s.weight_decays(steps_per_epoch)
    return {"lr": lr, "steps_per_epoch": steps_per_epoch,
            "epochs": s.finetune_steps / max(steps_per_epoch, 1),
            "paper_weight_decays": list(s.paper_weight_decays),
            "paper_steps_per_epoch": s.paper_steps_per_epoch,
            "weight_decays": list(wds), "schedule_factor_sum": factor_sum,
            # total shrinkage of every weight by decay alone: 1 - exp(-wd * sum_t factor(t))
            "weight_shrink": [1 - float(np.exp(-w * factor_sum)) for w in wds],
            "attention_dropouts": list(s.attention_dropouts)}

  # -- phase 4
  def analyze(self, base_params: Any, run: dict) -> dict:
    from lora_jax.analysis.analyze import analyze
    a = analyze(base_params, run["params"], finetuned_lora=run["lora"], progress=False)
    ranks = [r["rank_delta"] for r in a.rows if r["fro_delta"] > 0]  # adapted matrices only
    mid = a.meta["layers"][len(a.meta["layers"]) // 2]
    spectra = {}
    for m in a.modules:
      layers = list(a.spectra[f"{m}.layers"])
      i = layers.index(mid)
      spectra[m] = {w: a.spectra[f"{m}.{w}"][i] for w in ("base", "delta")}
    return {"rank_by_layer": {m: (list(map(int, l)), list(map(int, r)))
                              for m, (l, r) in a.rank_by_layer("delta").items()},
            "rank_median": float(np.median(ranks)), "rank_max": int(max(ranks)),
            "rank_min": int(min(ranks)), "spectra_layer": int(mid), "spectra": spectra,
            "rel_delta_norm": float(np.mean([r["rel_delta_norm"] for r in a.rows]))}


def _analyzed(run: dict) -> bool:
  """Whether a run's dW is analyzed: a kept run (its LR won the selection) that is not one of
  the regularized full-FT runs."""
  return run["selected"] and run["role"] != "regularizer"


def _stop_if_preempted(result) -> None:
  """`train` returns early on SIGTERM (a preemption: checkpoint saved); the demo stops there
  rather than going on to its next run."""
  if result.preempted:
    raise SystemExit(result.exit_code)


def cpu_model() -> str:
  """The CPU's model name (as `lscpu` shows it), or the platform's processor string."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"


def _point(step: int, ev: dict) -> dict:
  return {"step": int(step), "target_acc": ev["target"]["acc"],
          "target_loss": round(float(ev["target"]["loss"]), 5),
          "source_acc": ev["source"]["acc"]}


def _fmt_time(t: dict) -> str:
  return f"{t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU"


def select_lr(runs: list[dict]) -> dict:
  """The run with the lowest final target validation loss (the paper tuned LRs on the target)."""
  return min(runs, key=lambda r: r["curve"][-1]["target_loss"])


# --------------------------------------------------------------------------- all phases
def run_demo(settings: DemoSettings, out_dir: str, echo: Callable[[str], None] = print) -> dict:
  """Runs every phase; writes results.json, report.md and PNGs to `out_dir`; returns results."""
  from lora_jax.demo import report, verdict
  from lora_jax.lora import count_params
  total = Clock()
  os.makedirs(out_dir, exist_ok=True)
  demo = Demo(settings, out_dir, echo)
  base = demo.pretrain()

  ft_clock = Clock()
  grid_full, grid_lora = settings.grid()
  steps_per_epoch = demo.batches(demo.target_train, 2, demo.finetune_seq_len).batches_per_epoch
  n_regs = len(settings.regularizer_runs(0.0, steps_per_epoch))
  total_runs = len(grid_full) + len(grid_lora) + len(settings.lora_runs(0.0)) + n_regs
  runs, spectra = [], {}

  def go(spec, role):
    grid = role == "grid"
    run = demo.finetune(spec, base, len(runs) + 1, total_runs, grid=grid and len(
        grid_full if spec.rank == 0 else grid_lora) > 1)
    run["selected"] = not grid  # a grid run is kept only if its LR wins the selection
    run["role"] = role
    runs.append(run)
    return run

  full_runs = [go(spec, "grid") for spec in grid_full]
  lora_grid = [go(spec, "grid") for spec in grid_lora]
  best_full = select_lr(full_runs)
  best_lora = select_lr(lora_grid)
  if len(grid_full) > 1 or len(grid_lora) > 1:
    echo(f"      selected by final target validation loss: full FT lr {best_full['spec'].lr:g}, "
         f"LoRA lr {best_lora['spec'].lr:g}")
  best_full["selected"] = best_lora["selected"] = True
  for spec in settings.lora_runs(best_lora["spec"].lr):
    go(spec, "lora")
  demo.timings["finetune"] = ft_clock.read()
  reg_clock = Clock()
  for spec in settings.regularizer_runs(best_full["spec"].lr, steps_per_epoch):
    go(spec, "regularizer")
  demo.timings["regularizers"] = reg_clock.read()

  div_clock = Clock()
  diversity = demo.diversity(base, [best_full] + sorted(
      (r for r in runs if r["selected"] and r["spec"].is_lora and r["spec"].targets == "all"),
      key=lambda r: r["spec"].rank))
  demo.timings["diversity"] = div_clock.read()

  kept = [r for r in runs if _analyzed(r)]
  echo(f"[4/5] analyze: SVD of every dW of the {len(kept)} kept runs (not the regularized ones)")
  an_clock = Clock()
  module = "up_proj"
  rows = []
  spectra_layer = None
  for run in runs:
    spec = run["spec"]
    row = {"name": spec.name, "label": spec.label, "rank": spec.rank, "targets": spec.targets,
           "lr": spec.lr, "weight_decay": spec.weight_decay,
           "attention_dropout": spec.attention_dropout, "role": run["role"],
           "selected": run["selected"], "curve": run["curve"],
           "loss": run["loss"], "time": run["time"], "delta_rank": None}
    rows.append(row)
    if not _analyzed(run):
      continue  # an LR that lost the selection (or a regularized run): its dW is not analyzed
    a = demo.analyze(base, run)
    row.update({
        "delta_rank": {"median": a["rank_median"], "max": a["rank_max"], "min": a["rank_min"]},
        "rank_by_layer": a["rank_by_layer"], "rel_delta_norm": a["rel_delta_norm"]})
    if not spectra and module in a["spectra"]:
      spectra["W_base"] = a["spectra"][module]["base"]
    if module in a["spectra"]:
      spectra[f"ΔW {spec.label}"] = a["spectra"][module]["delta"]
    spectra_layer = a["spectra_layer"]
    echo(f"      {spec.label}: dW rank@90% median {a['rank_median']:g}, max {a['rank_max']}")
  demo.timings["analyze"] = an_clock.read()

  echo("[5/5] report")
  rep_clock = Clock()
  s = settings
  results = {
      "settings": dataclasses.asdict(s),
      "domains": {"source": demo.source.describe(), "target": demo.target.describe()},
      "hidden_size": s.hidden_size, "quick": s.quick, "finetune_seq_len": demo.finetune_seq_len,
      "n_source": len(demo.source_eval), "n_target": len(demo.target_eval),
      "params": count_params(base),
      "base": {"target_acc": demo.base_eval["target"]["acc"],
               "source_acc": demo.base_eval["source"]["acc"]},
      "runs": rows, "spectra_layer": spectra_layer, "spectra_module": module,
      "regularizers": demo.regularizer_info(steps_per_epoch, best_full["spec"].lr),
      "diversity": diversity,
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": jax.device_count(), "cpu_count": os.cpu_count(),
                      "cpu_model": cpu_model()},
  }
  results["verdict"] = verdict.verdict(results)
  figures = report.write_figures(results, spectra, out_dir)
  demo.timings["report"] = rep_clock.read()
  demo.timings["total"] = total.read()
  results["timings"] = demo.timings
  results["figures"] = figures
  report.write_markdown(results, figures, out_dir)
  report.write_results(results, out_dir)
  return results
