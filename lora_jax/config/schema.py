"""The schema of a lora-jax training run: every key with its default, flat views, type checks
and value validation.

Every file in configs/ starts here:

    from lora_jax.config import default_config
    def get_config():
      c = default_config()
      c.lora.rank = 64
      return c

`check_schema(cfg)` rejects keys absent from `default_config()` and values whose type does not
match the default's (ints are accepted for floats); `validate_config(cfg)` checks values. Both
raise `ConfigError`, whose message starts with the offending key. Loading files and overrides is
`lora_jax.config.loading`; the objects the sections build are `lora_jax.config.build`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable

import ml_collections

from lora_jax.config.build import frozen_patterns, keep_steps, lora_config
from lora_jax.config.errors import ConfigError, require
from lora_jax.config.model import PRESETS, LlamaConfig

OPTIMIZERS = ("adamw", "lionw")
SCHEDULES = ("cosine_with_warmup", "inv_sqrt_with_warmup", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REGIMES = ("cpt", "ift")
SOURCES = ("synthetic", "jsonl", "parquet", "arrayrecord", "tfds")
EXPORTS = ("auto", "adapter", "hf", "native", "all", "none")
# Keys that may differ between a run and its resumption without --force (they change neither
# the numerics nor the data order): logging, evaluation cadence, checkpoint bookkeeping, mesh.
RESUME_SAFE = ("train.log_every", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.export", "train.tensorboard",
               "train.async_checkpointing", "train.max_bad_steps", "train.peak_flops",
               "mesh.", "distributed", "data.num_workers", "eval.", "output_dir")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.output_dir = "runs/default"

  # Model: a preset name from lora_jax.config.PRESETS, or an HF directory (config.json +
  # safetensors) in `hf_path` (the preset is then ignored). `overrides` patch LlamaConfig fields.
  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"
  c.model.hf_path = ""
  c.model.overrides = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.attention_dropout = 0.0  # dropout on attention probabilities (training only)
  c.model.platform = "auto"  # kernels for "cpu" / "tpu" / "gpu"; "auto": the mesh's devices

  # LoRA: `lora.enabled=False` is full finetuning.
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 0.0  # 0: 2 * rank (the paper's choice)
  c.lora.dropout = 0.05
  c.lora.targets = "all"  # "attention", "mlp", "all" or "q_proj,v_proj,..."
  c.lora.use_rslora = False
  c.lora.init = "default"  # "default" (Kaiming A, zero B), "gaussian", "pissa"
  # Full finetuning only: comma-separated regexes of "/"-joined param paths to keep frozen
  # (e.g. "embed_tokens").
  c.full_ft_frozen = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "lionw"  # "adamw" or "lionw" (decoupled LionW, as Composer)
  c.optimizer.lr = 1e-4  # peak learning rate
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8  # adamw only
  c.optimizer.weight_decay = 0.0  # decoupled: p -= weight_decay * (lr / peak_lr) * p
  c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 disables

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine_with_warmup"  # or "inv_sqrt_with_warmup", "constant"
  c.schedule.warmup_steps = 0  # used when warmup_fraction is 0
  c.schedule.warmup_fraction = 0.1
  c.schedule.alpha_f = 0.01  # final LR factor (cosine)
  c.schedule.cooldown_fraction = 0.2  # inv_sqrt: linear cooldown over this end fraction
  c.schedule.inv_sqrt_scale_steps = 0  # inv_sqrt: t_scale; 0 -> the warmup steps (or 1)
  c.schedule.alpha_f_decay = 0.0  # inv_sqrt: factor the decay tends to at infinite time
  c.schedule.alpha_f_cooldown = 0.0  # inv_sqrt: factor at the end of the cooldown

  # Length of training: the first non-zero of steps, epochs, token_budget decides.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 0
  c.train.epochs = 0.0
  c.train.token_budget = 0
  c.train.global_batch = 8  # sequences per optimizer step, across all devices and hosts
  c.train.microbatches = 1  # gradient accumulation
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 0  # 0: never
  c.train.checkpoint_every = 0  # 0: only at the end (and on SIGTERM)
  c.train.keep_checkpoints = 3
  # Comma-separated steps that are always checkpointed and never deleted (e.g. the paper's CPT
  # token milestones for the spectral analysis).
  c.train.keep_steps = ""
  c.train.async_checkpointing = True
  # Under output_dir/export/: "auto" = adapter/ (PEFT) for LoRA, plus native/ (lora-jax
  # checkpoint) when the base is a preset init, hf/ for full FT; "adapter"; "hf" (LoRA merged);
  # "native"; "all"; "none".
  c.train.export = "auto"
  c.train.max_bad_steps = 0  # NaN/Inf steps to skip before stopping (0: stop at the first)
  c.train.tensorboard = True
  c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: look up the device kind

  # Mesh: axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.distributed = False  # jax.distributed.initialize() (auto-detected on TPU VMs)

  c.data = ml_collections.ConfigDict()
  c.data.regime = "cpt"  # "cpt" (packed raw text) or "ift" (prompt/response, loss on response)
  c.data.source = "synthetic"  # "synthetic", "jsonl", "parquet", "arrayrecord", "tfds"
  c.data.path = ""  # file, glob or TFDS name (e.g. "huggingface:..." builders)
  c.data.split = "train"
  c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default)
  c.data.text_field = "text"
  c.data.format = "auto"  # IFT: "magicoder", "metamath", "chat" or "auto"
  c.data.tokenizer = "byte"  # "byte", a tokenizer.json path, or a SentencePiece .model path
  c.data.pack = True  # IFT: pack samples (True) or pad each to seq_len (False)
  c.data.packing_ratio = 0.0  # IFT: >= 1 packs int(ratio x batch) samples per step (LLM-Foundry)
  c.data.add_bos = True  # prepend BOS to every document (CPT) / sample (IFT); EOS always ends one
  c.data.skip_malformed = False  # count and skip bad rows instead of failing
  c.data.shuffle = True
  c.data.num_workers = 0
  c.data.synthetic_docs = 512  # documents in the generated corpus (source="synthetic")

  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ""  # e.g. "gsm8k,forgetting"; run every train.eval_every steps
  c.eval.data_dir = ""
  c.eval.limit = 0
  c.eval.best_metric = "auto"  # "task/metric" kept as best checkpoint; auto: first "*/loss"
  c.eval.best_mode = "min"
  return c


# --------------------------------------------------------------------------- flat views
def flatten(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} for every leaf; an empty ConfigDict (model.overrides) is a leaf `{}`."""
  items = cfg.items() if isinstance(cfg, (dict, ml_collections.ConfigDict)) else []
  out: dict[str, Any] = {}
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)) and key != "model.overrides":
      out.update(flatten(v, key + "."))
    elif key == "model.overrides":
      out[key] = dict(v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
    else:
      out[key] = v
  return out


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(cfg.to_dict()))


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """A config from `to_dict` output (e.g. a run's config.json), checked against the schema."""
  cfg = default_config()
  _merge(cfg, d, "")
  return cfg


def _merge(cfg: ml_collections.ConfigDict, d: dict, prefix: str):
  for k, v in d.items():
    key = f"{prefix}{k}"
    if key == "model.overrides":
      cfg.overrides = ml_collections.ConfigDict(v)
    elif k not in cfg:
      raise ConfigError(key, "unknown config key")
    elif isinstance(cfg[k], ml_collections.ConfigDict):
      _merge(cfg[k], v, key + ".")
    else:
      cfg[k] = coerce(key, v, cfg[k])


def diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
         ignore: Iterable[str] = RESUME_SAFE) -> list[tuple[str, Any, Any]]:
  """[(key, a_value, b_value)] for keys whose values differ, skipping `ignore` prefixes."""
  fa, fb = flatten(a), flatten(b)
  out = []
  for key in sorted(set(fa) | set(fb)):
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in ignore):
      continue
    if fa.get(key) != fb.get(key):
      out.append((key, fa.get(key), fb.get(key)))
  return out


# --------------------------------------------------------------------------- types
def coerce(key: str, value: Any, default: Any) -> Any:
  """`value` converted to the type of `default`, or ConfigError naming `key`."""
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    raise ConfigError(key, f"expected a bool, got {value!r}")
  if isinstance(default, int):
    if isinstance(value, bool):
      raise ConfigError(key, f"expected an int, got {value!r}")
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        f = float(value)
      except ValueError:
        raise ConfigError(key, f"expected an int, got {value!r}") from None
      if f.is_integer():
        return int(f)
    raise ConfigError(key, f"expected an int, got {value!r}")
  if isinstance(default, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(key, f"expected a float, got {value!r}")
  if isinstance(default, str):
    if isinstance(value, str):
      return value
    raise ConfigError(key, f"expected a string, got {value!r}")
  return value


def check_schema(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict | None = None,
                 prefix: str = "") -> None:
  """Every key of `cfg` exists in `ref` (default: the schema) with a compatible type, and every
  key of `ref` is in `cfg`; values are coerced in place."""
  ref = default_config() if ref is None else ref
  for k in list(cfg.keys()):
    key = f"{prefix}{k}"
    if k not in ref:
      raise ConfigError(key, "unknown config key")
    if key == "model.overrides":
      for name in cfg[k].keys():
        check_model_override(name, f"{key}.{name}")
      continue
    if isinstance(ref[k], ml_collections.ConfigDict):
      if not isinstance(cfg[k], ml_collections.ConfigDict):
        raise ConfigError(key, "must be a section")
      check_schema(cfg[k], ref[k], key + ".")
    else:
      value = coerce(key, cfg[k], ref[k])
      if type(value) is not type(cfg[k]):
        cfg[k] = value
  for k in ref.keys():
    if k not in cfg:
      raise ConfigError(f"{prefix}{k}", "missing from the config (start from default_config())")


def check_model_override(name: str, key: str) -> None:
  """ConfigError naming `key` unless `name` is a LlamaConfig field."""
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  require(name in fields, key, f"not a LlamaConfig field; valid: {sorted(fields)}")


# --------------------------------------------------------------------------- validation
def _one_of(cfg, key: str, choices: tuple):
  value = cfg
  for p in key.split("."):
    value = value[p]
  require(value in choices, key, f"{value!r} is not one of {list(choices)}")


def validate_config(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int = 1) -> None:
  """Raises ConfigError (naming the key) for invalid values. With `num_devices` it also checks
  the mesh against the devices and the batch against the data-parallel size."""
  # sharding imports jax; the schema itself stays importable without it.
  from lora_jax.sharding import mesh_axis_sizes, mesh_shape
  check_schema(cfg)
  require(bool(cfg.output_dir), "output_dir", "must not be empty")
  # model
  if cfg.model.hf_path:
    require(os.path.isfile(os.path.join(cfg.model.hf_path, "config.json")), "model.hf_path",
            f"{cfg.model.hf_path!r} is not an HF model directory (no config.json)")
  else:
    _one_of(cfg, "model.preset", tuple(sorted(PRESETS)))
  _one_of(cfg, "model.dtype", DTYPES)
  _one_of(cfg, "model.param_dtype", DTYPES)
  require(0 <= cfg.model.attention_dropout < 1, "model.attention_dropout",
          f"must be in [0, 1), got {cfg.model.attention_dropout}")
  _one_of(cfg, "model.platform", ("auto", "cpu", "gpu", "tpu"))
  # lora
  lora_config(cfg)  # raises ConfigError on rank/alpha/dropout/targets/init
  for pat in frozen_patterns(cfg):
    try:
      re.compile(pat)
    except re.error as e:
      raise ConfigError("full_ft_frozen", f"bad regex {pat!r}: {e}") from None
  # optimizer + schedule
  o = cfg.optimizer
  _one_of(cfg, "optimizer.name", OPTIMIZERS)
  require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
  require(0 <= o.b1 < 1, "optimizer.b1", f"must be in [0, 1), got {o.b1}")
  require(0 <= o.b2 < 1, "optimizer.b2", f"must be in [0, 1), got {o.b2}")
  require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
  require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
  require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
  s = cfg.schedule
  _one_of(cfg, "schedule.name", SCHEDULES)
  require(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
  require(0 <= s.warmup_fraction < 1, "schedule.warmup_fraction",
          f"must be in [0, 1), got {s.warmup_fraction}")
  require(0 <= s.alpha_f <= 1, "schedule.alpha_f", f"must be in [0, 1], got {s.alpha_f}")
  require(0 <= s.cooldown_fraction <= 1, "schedule.cooldown_fraction",
          f"must be in [0, 1], got {s.cooldown_fraction}")
  require(s.inv_sqrt_scale_steps >= 0, "schedule.inv_sqrt_scale_steps", "must be >= 0")
  require(0 <= s.alpha_f_cooldown <= s.alpha_f_decay <= 1 or s.name != "inv_sqrt_with_warmup",
          "schedule.alpha_f_cooldown", "need 0 <= alpha_f_cooldown <= alpha_f_decay <= 1")
  # train
  t = cfg.train
  require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
  require(t.epochs >= 0, "train.epochs", f"must be >= 0, got {t.epochs}")
  require(t.token_budget >= 0, "train.token_budget", f"must be >= 0, got {t.token_budget}")
  require(t.steps or t.epochs or t.token_budget, "train.steps",
          "set one of train.steps, train.epochs, train.token_budget")
  require(t.global_batch >= 1, "train.global_batch", f"must be >= 1, got {t.global_batch}")
  require(t.microbatches >= 1, "train.microbatches", f"must be >= 1, got {t.microbatches}")
  require(t.global_batch % t.microbatches == 0, "train.microbatches",
          f"train.global_batch={t.global_batch} is not divisible by {t.microbatches} microbatches")
  require(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
  require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
  require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
  require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
  require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
  require(t.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
  keep_steps(cfg)
  require(t.peak_flops >= 0, "train.peak_flops", "must be >= 0")
  _one_of(cfg, "train.export", EXPORTS)
  # data + eval
  _one_of(cfg, "data.regime", REGIMES)
  _one_of(cfg, "data.source", SOURCES)
  require(cfg.data.source == "synthetic" or bool(cfg.data.path), "data.path",
          f"required for data.source={cfg.data.source!r}")
  require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
  require(cfg.data.packing_ratio == 0 or (cfg.data.packing_ratio >= 1
                                          and cfg.data.regime == "ift"), "data.packing_ratio",
          f"must be 0 (off) or >= 1 with data.regime=ift, got {cfg.data.packing_ratio}")
  _one_of(cfg, "eval.best_mode", ("min", "max"))
  # devices
  if num_devices is None:
    mesh_axis_sizes(cfg.mesh)
    return
  data, fsdp, _ = mesh_shape(cfg.mesh, num_devices)
  dp = data * fsdp
  require(t.global_batch % (dp * t.microbatches) == 0, "train.global_batch",
          f"{t.global_batch} is not divisible by data-parallel size (mesh.data*mesh.fsdp = {dp})"
          f" x train.microbatches ({t.microbatches})")
  require(t.global_batch % num_processes == 0, "train.global_batch",
          f"{t.global_batch} is not divisible by the {num_processes} processes")
