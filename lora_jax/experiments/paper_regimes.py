"""What the four paper regimes share: Llama-2-7B, decoupled LionW, LoRA alpha = 2r, the variant
string, run names and sweep grids. Each regime file (configs/paper/code_cpt.py, math_cpt.py,
code_ift.py, math_ift.py) holds only its own table values and calls `build` / `standard_sweep`
here through `entry_points`.

A variant is a "key=value,key=value" string, the `get_config(arg)` parameter:

  method      full | lora                       (default lora)
  rank        LoRA rank; alpha is set to 2*rank (default 16)
  targets     all | attention | mlp             (default all)
  lr          learning rate; default: the paper's table for method and rank
  epochs      IFT: epochs (1, 2, 4, 8, 16 in the paper)
  tokens      CPT: token budget, e.g. 20e9
  wd          decoupled weight decay (regularization comparison; default 0)
  attn_dropout  attention dropout of the base model (default 0)
  seed        run seed
  pack        IFT: pack samples (default false: one padded sample per row, as the paper)
  data_root   where the prepared datasets live (local dir or gs://...)
  model_root  directory holding Llama-2-7b-hf (local dir; HF safetensors + tokenizer.model)
  out         output root; a run writes to {out}/{regime}/{run name}

`lora-jax train` loads `get_config()` (the default variant); `lora-jax sweep --variant ...` turns
any variant into that command plus the `--config.*` overrides that make it:

  lora-jax sweep --config configs/paper/code_ift.py --dry-run --variant method=full,epochs=4
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any, Iterable

from lora_jax.config import default_config

# ------------------------------------------------------------------------------ shared settings
MODEL_PRESET = "llama2_7b"
HF_MODEL_DIR = "Llama-2-7b-hf"  # from the HF hub repo meta-llama/Llama-2-7b-hf
RANKS = (16, 64, 256)
METHODS = ("full", "lora")
TARGETS = ("all", "attention", "mlp")
LORA_DROPOUT = 0.05

DEFAULT_PARAMS = {
    "method": "lora", "rank": 16, "targets": "all", "lr": None, "epochs": None, "tokens": None,
    "wd": 0.0, "attn_dropout": 0.0, "seed": 0, "pack": False,
    "data_root": "data", "model_root": "models", "out": "runs",
}
_INT_PARAMS = ("rank", "seed")
_FLOAT_PARAMS = ("lr", "epochs", "tokens", "wd", "attn_dropout")
_BOOL_PARAMS = ("pack",)


def regime(namespace: dict[str, Any]) -> Any:
  """A regime's table values (its UPPER_CASE globals) as attributes: `regime(globals())`."""
  return types.SimpleNamespace(**{k: v for k, v in namespace.items() if k.isupper()})


# ------------------------------------------------------------------------------ variant strings
def parse_variant(arg: str | None) -> dict[str, Any]:
  """Parses "method=lora,rank=16" into typed params over DEFAULT_PARAMS; unknown keys fail."""
  params = dict(DEFAULT_PARAMS)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config variant {item!r} is not key=value; keys: {sorted(DEFAULT_PARAMS)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in DEFAULT_PARAMS:
      raise ValueError(f"unknown config variant key {key!r}; valid keys: {sorted(DEFAULT_PARAMS)}")
    params[key] = _typed(key, value)
  if params["method"] not in METHODS:
    raise ValueError(f"variant method={params['method']!r}; choose one of {METHODS}")
  if params["targets"] not in TARGETS:
    raise ValueError(f"variant targets={params['targets']!r}; choose one of {TARGETS}")
  return params


def _typed(key: str, value: str) -> Any:
  try:
    if key in _INT_PARAMS:
      return int(value)
    if key in _FLOAT_PARAMS:
      return float(value)
  except ValueError:
    raise ValueError(f"config variant {key}={value!r} is not a number") from None
  if key in _BOOL_PARAMS:
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config variant {key}={value!r} is not true/false")
    return value.lower() in ("true", "1")
  return value


def format_variant(params: dict[str, Any]) -> str:
  """The inverse of `parse_variant` for the keys that differ from the defaults."""
  items = []
  for key, value in params.items():
    if key in DEFAULT_PARAMS and value == DEFAULT_PARAMS[key]:
      continue
    if isinstance(value, bool):
      value = str(value).lower()
    elif isinstance(value, float):
      value = _num(value)
    items.append(f"{key}={value}")
  return ",".join(items)


def _num(x: float) -> str:
  """Short float text: 2e-4 -> "2e-4", 4.0 -> "4", 0.05 -> "0.05", 2e10 -> "2e10"."""
  if float(x).is_integer() and abs(x) < 1e6:
    return str(int(x))
  if 1e-2 <= abs(x) < 1e6:
    return f"{x:g}"
  mantissa, exp = f"{x:e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exp)}"


# ------------------------------------------------------------------------------ names
def run_name(regime: Any, params: dict[str, Any]) -> str:
  """A readable, unique name: code_ift-lora-r256-attention-lr1e-4-wd1e-4-ep4-s1."""
  p = params
  parts = [regime.NAME, p["method"]]
  if p["method"] == "lora":
    parts.append(f"r{p['rank']}")
    if p["targets"] != "all":
      parts.append(p["targets"])
  parts.append("lr" + _num(learning_rate(regime, p)))
  if p["wd"]:
    parts.append("wd" + _num(p["wd"]))
  if p["attn_dropout"]:
    parts.append("adrop" + _num(p["attn_dropout"]))
  if regime.KIND == "ift":
    parts.append("ep" + _num(p["epochs"] or regime.EPOCHS[-1]))
    if p["pack"]:
      parts.append("packed")
  else:
    parts.append(_tokens_text(p["tokens"] or regime.TOKEN_BUDGET))
  if p["seed"]:
    parts.append(f"s{p['seed']}")
  return "-".join(parts)


def _tokens_text(tokens: float) -> str:
  b = tokens / 1e9
  return (f"{b:g}B" if b >= 1 else f"{tokens / 1e6:g}M").replace(".", "p")


# ------------------------------------------------------------------------------ values
def learning_rate(regime: Any, params: dict[str, Any]) -> float:
  """The paper's LR for a method and rank (regime.LR), unless the variant sets `lr`."""
  if params["lr"] is not None:
    return float(params["lr"])
  if params["method"] == "full":
    return regime.LR["full"]
  return regime.LR.get(f"lora_r{params['rank']}", regime.LR["lora"])


def tokens_per_step(regime: Any) -> int:
  return regime.GLOBAL_BATCH * regime.SEQ_LEN


def checkpoint_steps(regime: Any) -> list[int]:
  """CPT: the optimizer steps at which the paper's token checkpoints fall (rounded up)."""
  return [math.ceil(t / tokens_per_step(regime)) for t in regime.CHECKPOINT_TOKENS]


def build(regime: Any, arg: str | None = None):
  """The run config of `regime` (a regime config module) for the variant string `arg`."""
  p = parse_variant(arg)
  if regime.KIND == "cpt" and (p["epochs"] is not None or p["pack"]):
    raise ValueError(f"{regime.NAME} is continued pretraining: set its length with tokens=..., "
                     "not epochs=...; CPT data is always packed")
  if regime.KIND == "ift" and p["tokens"] is not None:
    raise ValueError(f"{regime.NAME} is instruction finetuning: set its length with epochs=...")
  c = default_config()
  c.lock()  # a misspelt key fails here instead of adding a new one
  c.seed = p["seed"]
  c.output_dir = f"{p['out'].rstrip('/')}/{regime.NAME}/{run_name(regime, p)}"

  # Model: Llama-2-7B weights from an HF directory; bf16 compute, fp32 master weights.
  c.model.preset = MODEL_PRESET
  c.model.hf_path = f"{p['model_root'].rstrip('/')}/{HF_MODEL_DIR}"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.model.attention_dropout = p["attn_dropout"]

  c.lora.enabled = p["method"] == "lora"
  c.lora.rank = p["rank"]
  c.lora.alpha = float(2 * p["rank"])
  c.lora.dropout = LORA_DROPOUT
  c.lora.targets = p["targets"]
  c.lora.use_rslora = False

  c.optimizer.name = "lionw"  # decoupled LionW, as Composer's DecoupledLionW
  c.optimizer.lr = learning_rate(regime, p)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = p["wd"]
  c.optimizer.grad_clip = 1.0

  c.train.global_batch = regime.GLOBAL_BATCH
  c.train.seq_len = regime.SEQ_LEN
  c.train.microbatches = 1
  c.train.log_every = 10
  c.train.keep_checkpoints = 2  # rolling checkpoints for resuming after preemption
  c.train.export = "auto"  # PEFT adapter for LoRA, HF directory for full FT

  # FSDP over every chip: full FT state (fp32 params + LionW momentum + grads) is ~81 GB.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.data.regime = regime.KIND
  c.data.source = regime.DATA["source"]
  c.data.path = f"{p['data_root'].rstrip('/')}/{regime.DATA['path']}"
  c.data.split = "train"
  c.data.text_field = regime.DATA.get("text_field", "text")
  c.data.format = regime.DATA.get("format", "auto")
  c.data.tokenizer = f"{c.model.hf_path}/tokenizer.model"  # Llama-2 SentencePiece

  if regime.KIND == "cpt":
    c.data.pack = True
    c.train.token_budget = int(p["tokens"] or regime.TOKEN_BUDGET)
    c.schedule.name = "inv_sqrt_with_warmup"
    c.schedule.warmup_fraction = 0.0
    c.schedule.warmup_steps = regime.WARMUP_STEPS
    c.schedule.cooldown_fraction = 0.2
    c.train.checkpoint_every = regime.CHECKPOINT_EVERY
  else:
    c.data.pack = p["pack"]
    c.train.epochs = float(p["epochs"] or regime.EPOCHS[-1])
    c.schedule.name = "cosine_with_warmup"
    c.schedule.warmup_fraction = 0.1
    c.schedule.warmup_steps = 0
    c.schedule.alpha_f = 0.01
    c.train.checkpoint_every = regime.CHECKPOINT_EVERY
  _set_keep_points(c, regime)

  c.eval.tasks = ",".join(regime.EVAL_TASKS)
  c.eval.data_dir = f"{p['data_root'].rstrip('/')}/eval"
  c.eval.limit = 0
  c.train.eval_every = 0  # evaluation runs after training (`lora-jax eval`)
  return c


def _set_keep_points(c, regime) -> None:
  """CPT: never delete the checkpoints at the paper's token milestones (train.keep_steps)."""
  if regime.KIND == "cpt":
    c.train.keep_steps = ",".join(str(s) for s in checkpoint_steps(regime))


# ------------------------------------------------------------------------------ sweeps
def grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
  """The cartesian product of `axes` as a list of param dicts (in axis order)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


def methods(ranks: Iterable[int] = RANKS) -> list[dict[str, Any]]:
  """Full finetuning plus LoRA at each rank."""
  return [{"method": "full"}] + [{"method": "lora", "rank": r} for r in ranks]


def cross(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{**x, **y} for x in a for y in b]


def variants(params_list: list[dict[str, Any]]) -> list[str]:
  """Param dicts to variant strings (only the non-default keys)."""
  return [format_variant({**DEFAULT_PARAMS, **p}) for p in params_list]


def budget_axis(regime: Any) -> list[dict[str, Any]]:
  """IFT: one run per epoch count (cosine depends on the run length). CPT: one run to the full
  budget, with the token checkpoints saved along the way (inverse-sqrt needs no horizon)."""
  if regime.KIND == "ift":
    return [{"epochs": float(e)} for e in regime.EPOCHS]
  return [{"tokens": float(regime.TOKEN_BUDGET)}]


def standard_sweep(regime: Any) -> dict[str, list[str]]:
  """The groups every regime has.

  main     full FT and LoRA r in {16, 64, 256}, all targets, the paper's LRs, every budget.
  targets  LoRA r in {16, 256} on attention-only and MLP-only modules (the target ablation).
  lr       an LR search around the paper's values (our grid, from the paper's advice to sweep
           1e-5..5e-4 with LoRA ~10x full FT), at a short budget: LR_SEARCH_BUDGET.
  """
  budget = budget_axis(regime)
  main = cross(methods(), budget)
  targets = cross(grid(method=["lora"], rank=[16, 256], targets=["attention", "mlp"]), budget)
  short = [regime.LR_SEARCH_BUDGET]
  lr = (cross(grid(method=["full"], lr=regime.LR_GRID["full"]), short)
        + cross(grid(method=["lora"], rank=[16, 256], lr=regime.LR_GRID["lora"]), short))
  return {"main": variants(main), "targets": variants(targets), "lr": variants(lr)}


def entry_points(namespace: dict[str, Any]) -> tuple:
  """(get_config, run_name, get_sweep) of the regime file whose globals are `namespace`.

  get_config(arg) -> run config of a variant; run_name(arg) -> its run name; get_sweep() ->
  group -> variant strings (`standard_sweep`, plus the file's own `extra_sweep_groups(regime)`
  when it defines one).
  """

  def get_config(arg=None):
    return build(regime(namespace), arg)

  def run_name_of(arg=None):
    return run_name(regime(namespace), parse_variant(arg))

  def get_sweep():
    reg = regime(namespace)
    groups = standard_sweep(reg)
    extra = namespace.get("extra_sweep_groups")
    if extra is not None:
      groups.update(extra(reg))
    return groups

  return get_config, run_name_of, get_sweep
