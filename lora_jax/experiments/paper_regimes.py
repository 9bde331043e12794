"""What the four paper regimes share: Llama-2-7B, decoupled LionW, LoRA alpha = 2r, the variant
string, run names, sweep grids and the CPT trunk + cooldown branches. Each regime file
(configs/paper/code_cpt.py, math_cpt.py, code_ift.py, math_ift.py) holds only its own table
values and calls `build` / `standard_sweep` here through `entry_points`.

Sources: "A" = the paper's Appendix A (TMLR version), "T" = the authors' published training
table, "F" = LLM-Foundry's defaults the paper ran with, "P" = this project's choice where the
paper is silent (../shared/reference/paper_protocol.md carries all of them):

  model        Llama-2-7B, bf16 compute (amp_bf16), fp32 master weights               A
  optimizer    decoupled LionW, betas (0.9, 0.95), grad clip 1.0                       A
  weight decay 1e-6 for code CPT, 0 for the other three (Composer decoupled)           A, T
  LoRA         r in {16, 64, 256}, alpha = 2r, dropout 0.05, all seven modules          A
  Fig. S1      LR sweep: all modules but gate_proj, alpha = 32                         A (App. B)
  CPT          seq 4096 x 192; inv_sqrt_with_warmup: t_warmup = t_scale = 1000 batches,
               alpha_f_decay = 1 (flat), t_cooldown = 20% of the run (5086 of 25,432
               batches at 20B), alpha_f_cooldown = 0                                   A, T, F
  CPT budgets  0.25, 0.5, 1, 2, 4, 8, 16, 20B tokens, each after its own cooldown: the
               last 20% of T retrained from the 20B trunk's checkpoint at 0.8 T         A
  IFT          cosine, 10% warmup, final factor 0.01; 1, 2, 4, 8, 16 epochs            A
  IFT packing  packing_ratio 3: 193 steps per Magicoder epoch at 192 x 4096            T
               (math IFT: the same ratio, 171 steps per epoch at 768 x 1024)           P
  tokenizer    Llama-2-7b-hf for CPT, Llama-2-7b-chat-hf for IFT (local directories)   A
  LR grids     around the paper's values (it advises 1e-5..5e-4, LoRA ~10x full FT)     P
  checkpoints  CHECKPOINT_EVERY (resume after preemption), keep 2                      P

A variant is a "key=value,key=value" string, the `get_config(arg)` parameter:

  method      full | lora                       (default lora)
  rank        LoRA rank (default 16)
  alpha       LoRA alpha (default 2 * rank)
  targets     all | attention | mlp | no_gate   (default all; no_gate: Fig. S1)
  lr          learning rate; default: the paper's table for method and rank
  epochs      IFT: epochs (1, 2, 4, 8, 16 in the paper)
  tokens      CPT: token budget, e.g. 20e9 (the trunk) or 4e9 (a cooldown branch)
  wd          decoupled weight decay (default: the regime's, WEIGHT_DECAY)
  attn_dropout  attention dropout of the base model (default 0)
  seed        run seed
  pack        IFT: pack samples with PACKING_RATIO (default true, as the authors' step
              counts); false: one padded sample per row
  data_root   where the prepared datasets live (local dir or gs://...)
  model_root  directory holding Llama-2-7b-hf and Llama-2-7b-chat-hf (local dirs: HF
              safetensors + tokenizer.model; nothing is fetched from the hub at run time)
  out         output root; a run writes to {out}/{regime}/{run name}

CPT budgets below the trunk's are cooldown branches (`cooldown_branch`): `lora-jax sweep`
seeds each from the trunk checkpoint at floor(0.8 T / tokens per step), which the trunk keeps
(train.keep_steps); a standalone run of T tokens gives the same model (the flat schedule does not
depend on the horizon), so a branch without its trunk in the sweep just starts from scratch.

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
CHAT_MODEL_DIR = "Llama-2-7b-chat-hf"  # meta-llama/Llama-2-7b-chat-hf: only its tokenizer is used
RANKS = (16, 64, 256)
METHODS = ("full", "lora")
TARGET_MODULES = {"all": "all", "attention": "attention", "mlp": "mlp",
                  "no_gate": "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"}
TARGETS = tuple(TARGET_MODULES)
LORA_DROPOUT = 0.05
COOLDOWN_FRACTION = 0.2  # CPT: the last 20% of every budget is its cooldown (Appendix A)
# CPT, both domains: LLM-Foundry inv_sqrt_with_warmup as the paper set it (Appendix A), in
# batches; alpha_f_decay = 1 makes the inverse-sqrt term flat (warmup, constant, cooldown).
CPT_SCHEDULE = {"warmup_steps": 1000, "inv_sqrt_scale_steps": 1000, "alpha_f_decay": 1.0,
                "alpha_f_cooldown": 0.0, "cooldown_fraction": COOLDOWN_FRACTION}
CPT_BUDGETS = (0.25e9, 0.5e9, 1e9, 2e9, 4e9, 8e9, 16e9, 20e9)  # tokens; no 10B (Appendix A)

DEFAULT_PARAMS = {
    "method": "lora", "rank": 16, "alpha": None, "targets": "all", "lr": None, "epochs": None,
    "tokens": None, "wd": None, "attn_dropout": 0.0, "seed": 0, "pack": True,
    "data_root": "data", "model_root": "models", "out": "runs",
}
_INT_PARAMS = ("rank", "seed")
_FLOAT_PARAMS = ("alpha", "lr", "epochs", "tokens", "wd", "attn_dropout")
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
    if p["alpha"] is not None:
      parts.append("a" + _num(p["alpha"]))
    if p["targets"] != "all":
      parts.append(p["targets"])
  parts.append("lr" + _num(learning_rate(regime, p)))
  if p["wd"] is not None and p["wd"] != regime.WEIGHT_DECAY:
    parts.append("wd" + _num(p["wd"]))
  if p["attn_dropout"]:
    parts.append("adrop" + _num(p["attn_dropout"]))
  if regime.KIND == "ift":
    parts.append("ep" + _num(p["epochs"] or regime.EPOCHS[-1]))
    if not p["pack"]:
      parts.append("unpacked")
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


def budget_steps(regime: Any, tokens: float) -> int:
  """CPT: optimizer steps of a `tokens` budget (rounded up, as the trainer's token_budget)."""
  return math.ceil(tokens / tokens_per_step(regime))


def branch_start_step(regime: Any, tokens: float) -> int:
  """CPT: the trunk step a budget's cooldown branch starts from: the last step at or before
  0.8 T (its cooldown, the last 20% of T, starts no earlier)."""
  return math.floor((1 - COOLDOWN_FRACTION) * tokens / tokens_per_step(regime))


def checkpoint_steps(regime: Any) -> list[int]:
  """CPT: the trunk steps its cooldown branches start from (train.keep_steps of the trunk)."""
  return [branch_start_step(regime, t) for t in CPT_BUDGETS if t < regime.TOKEN_BUDGET]


def cooldown_branch(regime: Any, arg: str | None) -> tuple[str, int] | None:
  """CPT: (trunk variant, trunk step to start from) when `arg` is a budget below the trunk's;
  None for the trunk itself and for IFT."""
  p = parse_variant(arg)
  if regime.KIND != "cpt" or not p["tokens"] or p["tokens"] >= regime.TOKEN_BUDGET:
    return None
  trunk = format_variant({**p, "tokens": None})
  return trunk, branch_start_step(regime, p["tokens"])


def build(regime: Any, arg: str | None = None):
  """The run config of `regime` (a regime config module) for the variant string `arg`."""
  p = parse_variant(arg)
  if regime.KIND == "cpt" and (p["epochs"] is not None or not p["pack"]):
    raise ValueError(f"{regime.NAME} is continued pretraining: set its length with tokens=..., "
                     "not epochs=...; CPT data is always packed")
  if regime.KIND == "ift" and p["tokens"] is not None:
    raise ValueError(f"{regime.NAME} is instruction finetuning: set its length with epochs=...")
  if p["tokens"] is not None and p["tokens"] > regime.TOKEN_BUDGET:
    raise ValueError(f"{regime.NAME}: tokens={p['tokens']:g} is beyond the paper's "
                     f"{regime.TOKEN_BUDGET:g}-token trunk")
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
  c.lora.alpha = float(2 * p["rank"] if p["alpha"] is None else p["alpha"])
  c.lora.dropout = LORA_DROPOUT
  c.lora.targets = TARGET_MODULES[p["targets"]]
  c.lora.use_rslora = False

  c.optimizer.name = "lionw"  # decoupled LionW, as Composer's DecoupledLionW
  c.optimizer.lr = learning_rate(regime, p)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = regime.WEIGHT_DECAY if p["wd"] is None else p["wd"]
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
  # Llama-2 SentencePiece: the base model's for CPT, the chat model's for IFT (Appendix A).
  tokenizer_dir = HF_MODEL_DIR if regime.KIND == "cpt" else CHAT_MODEL_DIR
  c.data.tokenizer = f"{p['model_root'].rstrip('/')}/{tokenizer_dir}/tokenizer.model"

  if regime.KIND == "cpt":
    c.data.pack = True
    c.train.token_budget = int(p["tokens"] or regime.TOKEN_BUDGET)
    c.schedule.name = "inv_sqrt_with_warmup"
    c.schedule.warmup_fraction = 0.0
    c.schedule.update(CPT_SCHEDULE)
    c.train.checkpoint_every = regime.CHECKPOINT_EVERY
  else:
    c.data.pack = p["pack"]
    c.data.packing_ratio = float(regime.PACKING_RATIO) if p["pack"] else 0.0
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
  """CPT trunk: never delete the checkpoints its cooldown branches start from."""
  if regime.KIND == "cpt" and c.train.token_budget >= regime.TOKEN_BUDGET:
    c.train.keep_steps = ",".join(str(s) for s in checkpoint_steps(regime))


def describe(regime: Any, arg: str | None = None) -> dict[str, Any]:
  """What a run does, in the paper's terms (for `lora-jax sweep --dry-run` and tests): steps,
  LR, weight decay, schedule, budget and packing. IFT steps come from the dataset's sample
  count (regime.NUM_SAMPLES), as LLM-Foundry counts them: N // (packing_ratio x batch) per epoch."""
  c = build(regime, arg)
  s = c.schedule
  out: dict[str, Any] = {"lr": c.optimizer.lr, "weight_decay": c.optimizer.weight_decay,
                         "batch": f"{c.train.global_batch}x{c.train.seq_len}"}
  if regime.KIND == "cpt":
    steps = budget_steps(regime, c.train.token_budget)
    out.update(tokens=c.train.token_budget, steps=steps, schedule={
        "name": s.name, "t_warmup": s.warmup_steps, "t_scale": s.inv_sqrt_scale_steps,
        "t_cooldown": int(round(s.cooldown_fraction * steps)), "alpha_f_decay": s.alpha_f_decay,
        "alpha_f_cooldown": s.alpha_f_cooldown})
    branch = cooldown_branch(regime, arg)
    if branch is not None:
      out["start_step"] = branch[1]
  else:
    per_step = (int(c.data.packing_ratio * c.train.global_batch) if c.data.packing_ratio
                else c.train.global_batch)
    per_epoch = regime.NUM_SAMPLES // per_step
    out.update(epochs=c.train.epochs, steps_per_epoch=per_epoch,
               steps=math.ceil(c.train.epochs * per_epoch), packing_ratio=c.data.packing_ratio,
               schedule={"name": s.name, "warmup_fraction": s.warmup_fraction,
                         "alpha_f": s.alpha_f})
  return out


def follow_ups(regime: Any, arg: str | None = None) -> list[tuple[list[str], str]]:
  """CPT full FT: the spectral analysis of ΔW of every budget's cooled-down model (Fig. 6: the
  exported HF directory against the base), written to <run>/analysis."""
  p = parse_variant(arg)
  if regime.KIND != "cpt" or p["method"] != "full":
    return []
  c = build(regime, arg)
  out = f"{c.output_dir}/analysis"
  return [(["analyze", "--base", c.model.hf_path, "--finetuned", f"{c.output_dir}/export/hf",
            "--out", out, "--quiet"], f"{out}/analysis.json")]


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
  """IFT: one run per epoch count (cosine depends on the run length). CPT: the 20B trunk first,
  then one cooldown branch per smaller budget (each starts from the trunk; `cooldown_branch`)."""
  if regime.KIND == "ift":
    return [{"epochs": float(e)} for e in regime.EPOCHS]
  return [{"tokens": None}] + [{"tokens": float(t)} for t in CPT_BUDGETS
                               if t < regime.TOKEN_BUDGET]


def standard_sweep(regime: Any) -> dict[str, list[str]]:
  """The groups every regime has.

  main     full FT and LoRA r in {16, 64, 256}, all targets, the paper's LRs, every budget.
  targets  LoRA r in {16, 256} on attention-only and MLP-only modules (the target ablation).
  lr       an LR search around the paper's values (our grid, from the paper's advice to sweep
           1e-5..5e-4 with LoRA ~10x full FT), at a short budget: LR_SEARCH_BUDGET.
  lr_s1    Fig. S1's LR sensitivity (Appendix B): LoRA r in {16, 256} on all modules but
           gate_proj with alpha = 32, and full FT, over LR_GRID, at LR_SEARCH_BUDGET.
  """
  budget = budget_axis(regime)
  main = cross(methods(), budget)
  targets = cross(grid(method=["lora"], rank=[16, 256], targets=["attention", "mlp"]), budget)
  short = [regime.LR_SEARCH_BUDGET]
  lr = (cross(grid(method=["full"], lr=regime.LR_GRID["full"]), short)
        + cross(grid(method=["lora"], rank=[16, 256], lr=regime.LR_GRID["lora"]), short))
  s1 = (cross(grid(method=["full"], lr=regime.LR_GRID["full"]), short)
        + cross(grid(method=["lora"], rank=[16, 256], alpha=[32.0], targets=["no_gate"],
                     lr=regime.LR_GRID["lora"]), short))
  return {"main": variants(main), "targets": variants(targets), "lr": variants(lr),
          "lr_s1": variants(s1)}


def entry_points(namespace: dict[str, Any]) -> tuple:
  """(get_config, run_name, get_sweep, branch_of, describe, follow_ups) of the regime file
  whose globals are `namespace`.

  get_config(arg) -> run config of a variant; run_name(arg) -> its run name; get_sweep() ->
  group -> variant strings (`standard_sweep`, plus the file's own `extra_sweep_groups(regime)`
  when it defines one); branch_of(arg) -> `cooldown_branch`, describe(arg) -> `describe` and
  follow_ups(arg) -> `follow_ups` (read by `lora-jax sweep`).
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

  def branch_of(arg=None):
    return cooldown_branch(regime(namespace), arg)

  def describe_of(arg=None):
    return describe(regime(namespace), arg)

  def follow_ups_of(arg=None):
    return follow_ups(regime(namespace), arg)

  return get_config, run_name_of, get_sweep, branch_of, describe_of, follow_ups_of
