"""The full schema of a lora-jax training run, with defaults, loading, overrides and validation.

Every file in configs/ starts here:

    from lora_jax.run_config import default_config
    def get_config():
      c = default_config()
      c.lora.rank = 64
      return c

Use: `lora-jax train --config configs/tiny_lora.py --config.optimizer.lr=3e-4`.
`load_config(path, overrides)` rejects keys absent from `default_config()` and values whose type
does not match the default's (ints are accepted for floats); `validate_config(cfg)` checks values.
Both raise `ConfigError`, whose message starts with the offending key.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from typing import Any, Iterable

import ml_collections

OPTIMIZERS = ("adamw", "lionw")
SCHEDULES = ("cosine_with_warmup", "inv_sqrt_with_warmup", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REGIMES = ("cpt", "ift")
SOURCES = ("synthetic", "jsonl", "parquet", "arrayrecord", "tfds")
EXPORTS = ("auto", "adapter", "hf", "native", "all", "none")
MESH_AXES = ("data", "fsdp", "tensor")
# Keys that may differ between a run and its resumption without --force (they change neither
# the numerics nor the data order): logging, evaluation cadence, checkpoint bookkeeping, mesh.
RESUME_SAFE = ("train.log_every", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.export", "train.tensorboard",
               "train.async_checkpointing", "train.max_bad_steps", "train.peak_flops",
               "mesh.", "distributed", "data.num_workers", "eval.", "output_dir")


class ConfigError(ValueError):
  """A bad run configuration; `key` is the dotted config key at fault."""

  def __init__(self, key: str, message: str):
    super().__init__(f"{key}: {message}")
    self.key = key


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
      cfg[k] = _coerce(key, v, cfg[k])


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


# --------------------------------------------------------------------------- loading
def _coerce(key: str, value: Any, default: Any) -> Any:
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


def _parse_literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `cfg[key] = text` converted to the existing value's type. `model.overrides.X` is free."""
  parts = key.split(".")
  if parts[:2] == ["model", "overrides"] and len(parts) == 3:
    _check_model_override(parts[2], key)
    cfg.model.overrides[parts[2]] = _parse_literal(text)
    return
  node = cfg
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ConfigError(key, f"unknown config key (no {'.'.join(parts[:i + 1])!r} in the schema)")
    if i < len(parts) - 1:
      node = node[p]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ConfigError(key, "is a section, not a value; set one of its keys")
  node[parts[-1]] = _coerce(key, text, node[parts[-1]])


def parse_overrides(argv: Iterable[str]) -> list[str]:
  """["a.b=v", ...] from CLI words "--config.a.b=v" or "--config.a.b v"."""
  words, out = list(argv), []
  i = 0
  while i < len(words):
    w = words[i]
    if not w.startswith("--config."):
      raise ConfigError(w, "unexpected argument; overrides look like --config.optimizer.lr=3e-4")
    body = w[len("--config."):]
    if "=" not in body:
      if i + 1 >= len(words):
        raise ConfigError(body, "override has no value")
      body = f"{body}={words[i + 1]}"
      i += 1
    out.append(body)
    i += 1
  return out


def load_config(path: str | None, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the Python file at `path` (default schema if None), applies
  overrides ("a.b=value" or "--config.a.b=value") and checks keys and types (not values)."""
  cfg = default_config()
  if path:
    if not os.path.isfile(path):
      raise ConfigError("config", f"no config file at {path!r}")
    loaded = _run_config_file(path)
    _check_schema(loaded, cfg, "")
    cfg = loaded
  for o in overrides:
    o = o[len("--config."):] if o.startswith("--config.") else o
    if "=" not in o:
      raise ConfigError(o, "override must look like key=value")
    key, text = o.split("=", 1)
    apply_override(cfg, key, text)
  return cfg


def _run_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the file at `path`; whatever the file raises (a syntax error, a value of
  the wrong type refused by ConfigDict, a NameError) becomes a ConfigError naming file:line."""
  try:
    spec = importlib.util.spec_from_file_location("_lora_jax_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError("config", f"{path} defines no get_config()")
    loaded = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - user code: any exception is a bad config file
    raise ConfigError("config", f"{_line_in(path, e)}: {type(e).__name__}: {e}") from None
  if not isinstance(loaded, ml_collections.ConfigDict):
    raise ConfigError("config", f"{path}: get_config() returned {type(loaded).__name__}, not a "
                      "ConfigDict (start from default_config())")
  return loaded


def _line_in(path: str, error: BaseException) -> str:
  """"path:line" of the innermost frame of `error` inside the file at `path` (or just path)."""
  target = os.path.abspath(path)
  if isinstance(error, SyntaxError) and error.filename and error.lineno:
    if os.path.abspath(error.filename) == target:
      return f"{path}:{error.lineno}"
  line = None
  tb = error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  return f"{path}:{line}" if line else path


def _check_schema(cfg, ref, prefix):
  """Every key of `cfg` exists in `ref` with a compatible type (values are coerced in place)."""
  for k in list(cfg.keys()):
    key = f"{prefix}{k}"
    if k not in ref:
      raise ConfigError(key, "unknown config key")
    if key == "model.overrides":
      for name in cfg[k].keys():
        _check_model_override(name, f"{key}.{name}")
      continue
    if isinstance(ref[k], ml_collections.ConfigDict):
      if not isinstance(cfg[k], ml_collections.ConfigDict):
        raise ConfigError(key, "must be a section")
      _check_schema(cfg[k], ref[k], key + ".")
    else:
      value = _coerce(key, cfg[k], ref[k])
      if type(value) is not type(cfg[k]):
        cfg[k] = value
  for k in ref.keys():
    if k not in cfg:
      raise ConfigError(f"{prefix}{k}", "missing from the config (start from default_config())")


def _check_model_override(name: str, key: str):
  import dataclasses

  from lora_jax.config import LlamaConfig
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  if name not in fields:
    raise ConfigError(key, f"not a LlamaConfig field; valid: {sorted(fields)}")


# --------------------------------------------------------------------------- validation
def _require(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(key, message)


def _one_of(cfg, key: str, choices: tuple):
  value = cfg[key] if "." not in key else _get(cfg, key)
  _require(value in choices, key, f"{value!r} is not one of {list(choices)}")


def _get(cfg, key: str):
  node = cfg
  for p in key.split("."):
    node = node[p]
  return node


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 resolved; ConfigError naming mesh.* if it cannot fit."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, sizes):
    _require(s == -1 or s >= 1, f"mesh.{a}", f"must be >= 1 or -1, got {s}")
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  _require(len(free) <= 1, f"mesh.{free[-1] if free else 'data'}",
           f"at most one mesh axis may be -1, got {free}")
  known = 1
  for s in sizes:
    known *= s if s != -1 else 1
  desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if free:
    _require(num_devices % known == 0, "mesh",
             f"{desc}: the {num_devices} devices are not divisible by the fixed axes' product "
             f"{known}")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  total = sizes[0] * sizes[1] * sizes[2]
  _require(total == num_devices, "mesh",
           f"{desc}: mesh.data*fsdp*tensor = {total} does not match the {num_devices} devices")
  return tuple(sizes)


def validate_config(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int = 1) -> None:
  """Raises ConfigError (naming the key) for invalid values. With `num_devices` it also checks
  the mesh against the devices and the batch against the data-parallel size."""
  _check_schema(cfg, default_config(), "")
  _require(bool(cfg.output_dir), "output_dir", "must not be empty")
  # model
  from lora_jax.config import PRESETS
  if cfg.model.hf_path:
    _require(os.path.isfile(os.path.join(cfg.model.hf_path, "config.json")), "model.hf_path",
             f"{cfg.model.hf_path!r} is not an HF model directory (no config.json)")
  else:
    _one_of(cfg, "model.preset", tuple(sorted(PRESETS)))
  _one_of(cfg, "model.dtype", DTYPES)
  _one_of(cfg, "model.param_dtype", DTYPES)
  _require(0 <= cfg.model.attention_dropout < 1, "model.attention_dropout",
           f"must be in [0, 1), got {cfg.model.attention_dropout}")
  # lora
  if cfg.lora.enabled:
    lora_config(cfg)  # raises ConfigError on rank/alpha/dropout/targets/init
  for pat in _split(cfg.full_ft_frozen):
    try:
      re.compile(pat)
    except re.error as e:
      raise ConfigError("full_ft_frozen", f"bad regex {pat!r}: {e}") from None
  # optimizer + schedule
  o = cfg.optimizer
  _one_of(cfg, "optimizer.name", OPTIMIZERS)
  _require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
  _require(0 <= o.b1 < 1, "optimizer.b1", f"must be in [0, 1), got {o.b1}")
  _require(0 <= o.b2 < 1, "optimizer.b2", f"must be in [0, 1), got {o.b2}")
  _require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
  _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
  _require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
  s = cfg.schedule
  _one_of(cfg, "schedule.name", SCHEDULES)
  _require(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
  _require(0 <= s.warmup_fraction < 1, "schedule.warmup_fraction",
           f"must be in [0, 1), got {s.warmup_fraction}")
  _require(0 <= s.alpha_f <= 1, "schedule.alpha_f", f"must be in [0, 1], got {s.alpha_f}")
  _require(0 <= s.cooldown_fraction <= 1, "schedule.cooldown_fraction",
           f"must be in [0, 1], got {s.cooldown_fraction}")
  _require(s.inv_sqrt_scale_steps >= 0, "schedule.inv_sqrt_scale_steps", "must be >= 0")
  _require(0 <= s.alpha_f_cooldown <= s.alpha_f_decay <= 1 or s.name != "inv_sqrt_with_warmup",
           "schedule.alpha_f_cooldown", "need 0 <= alpha_f_cooldown <= alpha_f_decay <= 1")
  # train
  t = cfg.train
  _require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
  _require(t.epochs >= 0, "train.epochs", f"must be >= 0, got {t.epochs}")
  _require(t.token_budget >= 0, "train.token_budget", f"must be >= 0, got {t.token_budget}")
  _require(t.steps or t.epochs or t.token_budget, "train.steps",
           "set one of train.steps, train.epochs, train.token_budget")
  _require(t.global_batch >= 1, "train.global_batch", f"must be >= 1, got {t.global_batch}")
  _require(t.microbatches >= 1, "train.microbatches", f"must be >= 1, got {t.microbatches}")
  _require(t.global_batch % t.microbatches == 0, "train.microbatches",
           f"train.global_batch={t.global_batch} is not divisible by {t.microbatches} microbatches")
  _require(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
  _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
  _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
  _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
  _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
  _require(t.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
  keep_steps(cfg)
  _require(t.peak_flops >= 0, "train.peak_flops", "must be >= 0")
  _one_of(cfg, "train.export", EXPORTS)
  # data + eval
  _one_of(cfg, "data.regime", REGIMES)
  _one_of(cfg, "data.source", SOURCES)
  _require(cfg.data.source == "synthetic" or bool(cfg.data.path), "data.path",
           f"required for data.source={cfg.data.source!r}")
  _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
  _one_of(cfg, "eval.best_mode", ("min", "max"))
  # devices
  for a in MESH_AXES:
    _require(cfg.mesh[a] == -1 or cfg.mesh[a] >= 1, f"mesh.{a}", "must be >= 1 or -1")
  if num_devices is not None:
    data, fsdp, _ = mesh_shape(cfg.mesh, num_devices)
    dp = data * fsdp
    _require(t.global_batch % (dp * t.microbatches) == 0, "train.global_batch",
             f"{t.global_batch} is not divisible by data-parallel size (mesh.data*mesh.fsdp = {dp})"
             f" x train.microbatches ({t.microbatches})")
    _require(t.global_batch % num_processes == 0, "train.global_batch",
             f"{t.global_batch} is not divisible by the {num_processes} processes")


def keep_steps(cfg: ml_collections.ConfigDict) -> list[int]:
  """train.keep_steps as sorted ints; ConfigError naming the key if malformed."""
  out = []
  for word in _split(cfg.train.keep_steps):
    try:
      out.append(int(word))
    except ValueError:
      raise ConfigError("train.keep_steps", f"{word!r} is not a step number") from None
    _require(out[-1] >= 1, "train.keep_steps", f"steps must be >= 1, got {out[-1]}")
  return sorted(set(out))


def _split(text: str) -> list[str]:
  return [p for p in re.split(r"[,\s]+", text or "") if p]


def lora_config(cfg: ml_collections.ConfigDict):
  """The run's `LoraConfig`, or None for full finetuning; ConfigError naming lora.* keys."""
  from lora_jax.lora import LoraConfig
  if not cfg.lora.enabled:
    return None
  _require(cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}")
  _require(cfg.lora.alpha >= 0, "lora.alpha", f"must be > 0 (0: 2 * rank), got {cfg.lora.alpha}")
  try:
    return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha or None, dropout=cfg.lora.dropout,
                      targets=cfg.lora.targets, use_rslora=cfg.lora.use_rslora,
                      init=cfg.lora.init)
  except ValueError as e:
    msg = str(e)
    key = re.match(r"(lora\.\w+)", msg)
    raise ConfigError(key.group(1) if key else "lora", msg.split(": ", 1)[-1]
                      if key else msg) from None


def frozen_patterns(cfg: ml_collections.ConfigDict) -> list[str]:
  return _split(cfg.full_ft_frozen)
