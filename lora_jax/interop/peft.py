"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

PEFT keys are `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([R, in]) and
`...lora_B.weight` ([out, R]); our leaves are `lora_a` [in, R] and `lora_b` [R, out] beside the
kernel, so both are transposed. scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) in both.

  save_peft(path, config, lora_config, params, base_model_name_or_path="")
  load_peft(path, config, params, dtype=None) -> (LoraConfig, params with LoRA leaves)

Only what lora-jax models can represent is accepted: the same rank, alpha and target modules in
every layer, no DoRA, no bias, no per-layer or per-module patterns, no modules_to_save.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax import fileio
from lora_jax.config import LlamaConfig
from lora_jax.fileio import atomic_dir, listed, read_json, write_json
from lora_jax.interop.hf import SUPPORTED_DTYPES, read_header, read_tensor, renamed
from lora_jax.lora import (ALL_MODULES, ATTENTION_MODULES, LORA_LEAVES, MLP_MODULES,
                           LoraConfig)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OWNED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what save_peft writes (and so may replace)
_GROUP = {m: "self_attn" for m in ATTENTION_MODULES} | {m: "mlp" for m in MLP_MODULES}
_KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+_proj)"
                     r"\.lora_(A|B)(?:\.default)?\.weight$")
# adapter_config.json fields whose non-default values change the math in ways we do not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
    "layers_to_transform": "per-layer targets", "layers_pattern": "per-layer targets",
    "modules_to_save": "fully trained extra modules", "exclude_modules": "excluded modules",
    "fan_in_fan_out": "transposed (Conv1D) weights", "lora_bias": "LoRA bias",
    "layer_replication": "layer replication", "target_parameters": "parameter targets",
    "trainable_token_indices": "trainable tokens", "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
}
# init_lora_weights values that move the base weights (the adapter alone is not the delta).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


def peft_key(layer: int, module: str, leaf: str) -> str:
  """PEFT key of our `lora_a` / `lora_b` leaf at `layers_{layer}/<group>/{module}`."""
  ab = {"lora_a": "A", "lora_b": "B"}[leaf]
  return f"base_model.model.model.layers.{layer}.{_GROUP[module]}.{module}.lora_{ab}.weight"


def peft_key_to_path(key: str) -> tuple[str, ...] | None:
  """`...layers.3.mlp.up_proj.lora_B.weight` -> ("layers_3", "mlp", "up_proj", "lora_b")."""
  m = _KEY_RE.match(key)
  if not m or _GROUP.get(m.group(3)) != m.group(2):
    return None
  return (f"layers_{m.group(1)}", m.group(2), m.group(3), "lora_" + m.group(4).lower())


def _targets_of(modules) -> tuple[str, ...]:
  modules = tuple(m for m in ALL_MODULES if m in set(modules))
  for name, group in (("all", ALL_MODULES), ("attention", ATTENTION_MODULES), ("mlp", MLP_MODULES)):
    if modules == group:
      return (name,)
  return modules


def adapter_config_dict(lora: LoraConfig, base_model_name_or_path: str = "") -> dict:
  alpha = lora.lora_alpha
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
      "r": int(lora.rank), "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": float(lora.dropout), "target_modules": list(lora.target_modules),
      "bias": "none", "use_rslora": bool(lora.use_rslora), "use_dora": False,
      "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": "gaussian" if lora.init == "gaussian" else True,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "layer_replication": None,
      "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
  }


def _kernel_shapes(params: Mapping) -> dict[tuple[int, str], tuple[int, int]]:
  """{(layer, module): (in, out)} for every projection kernel in params."""
  out = {}
  for p, x in traverse_util.flatten_dict(dict(params)).items():
    if len(p) == 4 and p[-1] == "kernel" and p[2] in _GROUP and p[0].startswith("layers_"):
      out[(int(p[0][len("layers_"):]), p[2])] = tuple(x.shape)
  return out


def save_peft(path: str, config: LlamaConfig, lora_config: LoraConfig, params: Mapping,
              base_model_name_or_path: str = "", *, overwrite: bool = False) -> str:
  """Writes a PEFT adapter dir (atomically) from params holding LoRA leaves; returns the path."""
  where = f"save_peft({path})"
  if lora_config.init == "pissa":
    raise ValueError(f"{where}: PiSSA adapters changed the base weights, so the adapter alone is "
                     "not the update; export the merged model with save_hf(..., lora_config=...)")
  flat = traverse_util.flatten_dict(dict(params))
  kernels = _kernel_shapes(params)
  errors, tensors = [], {}
  wanted = set()
  for layer in range(config.num_hidden_layers):
    for module in lora_config.target_modules:
      mod = (f"layers_{layer}", _GROUP[module], module)
      if (layer, module) not in kernels:
        errors.append(f"{'/'.join(mod)}/kernel: missing")
        continue
      d_in, d_out = kernels[(layer, module)]
      want = {"lora_a": (d_in, lora_config.rank), "lora_b": (lora_config.rank, d_out)}
      for leaf in LORA_LEAVES:
        wanted.add(mod + (leaf,))
        x = flat.get(mod + (leaf,))
        if x is None:
          errors.append(f"{'/'.join(mod + (leaf,))}: missing (add_lora with this LoraConfig?)")
        elif tuple(x.shape) != want[leaf]:
          errors.append(f"{'/'.join(mod + (leaf,))}: shape {list(x.shape)}, rank "
                        f"{lora_config.rank} implies {list(want[leaf])}")
        elif np.dtype(x.dtype) not in SUPPORTED_DTYPES.values():
          errors.append(f"{'/'.join(mod + (leaf,))}: unsupported dtype {np.dtype(x.dtype)}")
        else:
          tensors[peft_key(layer, module, leaf)] = np.ascontiguousarray(
              np.asarray(jax.device_get(x)).T)
  extra = ["/".join(p) for p in flat if p[-1] in LORA_LEAVES and p not in wanted]
  if extra:
    errors.append(f"LoRA leaves outside lora_config.targets={list(lora_config.targets)}: "
                  + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
  if errors:
    raise ValueError(f"{where}: params do not match lora_config:{listed(errors)}")
  from safetensors.numpy import save_file
  with atomic_dir(path, OWNED_FILES, overwrite=overwrite) as tmp:
    write_json(os.path.join(tmp, ADAPTER_CONFIG),
               adapter_config_dict(lora_config, base_model_name_or_path))
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  return fileio.abspath(path)


# --------------------------------------------------------------------------- loading
def _is_set(value: Any) -> bool:
  return value not in (None, False, "", [], {}, ())


def _module_names(num_layers: int) -> dict[str, tuple[int, str] | None]:
  """PEFT-visible module names of an HF LlamaForCausalLM -> (layer, module), None if unsupported."""
  names: dict[str, tuple[int, str] | None] = {"lm_head": None, "model.embed_tokens": None}
  for i in range(num_layers):
    for m in ALL_MODULES:
      names[f"model.layers.{i}.{_GROUP[m]}.{m}"] = (i, m)
  return names


def _resolve_targets(targets: Any, num_layers: int, file: str) -> tuple[str, ...]:
  """PEFT's matching rules (a list: exact name or "." suffix; a string: full regex match,
  or "all-linear") -> module names targeted uniformly in every layer."""
  names = _module_names(num_layers)
  if targets == "all-linear":
    return ALL_MODULES
  if isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise ValueError(f"{file}: target_modules {targets!r} is not a valid regex: {e}") from None
    matched = {n for n in names if pattern.fullmatch(n)}
    unknown = [] if matched else [targets]
  elif isinstance(targets, (list, tuple)) and targets:
    matched, unknown = set(), []
    for t in targets:
      hit = {n for n in names if n == t or n.endswith("." + str(t))}
      if not hit:
        unknown.append(str(t))
      matched |= hit
  else:
    raise ValueError(f"{file}: target_modules must be a non-empty list or a regex string, "
                     f"got {targets!r}")
  if unknown:
    raise ValueError(f"{file}: target_modules {unknown} match no module of this Llama "
                     f"(valid module names: {list(ALL_MODULES)})")
  unsupported = sorted(n for n in matched if names[n] is None)
  if unsupported:
    raise ValueError(f"{file}: target_modules reach {unsupported}; LoRA on embeddings or the "
                     "LM head is not supported")
  modules = {names[n][1] for n in matched}
  per_layer = {m: {names[n][0] for n in matched if names[n][1] == m} for m in modules}
  partial = sorted(m for m, layers in per_layer.items() if len(layers) != num_layers)
  if partial:
    raise ValueError(f"{file}: target_modules adapt {partial} in only some layers; lora-jax "
                     "applies the same targets to every layer")
  return tuple(m for m in ALL_MODULES if m in modules)


def read_adapter_config(path: str, num_layers: int) -> LoraConfig:
  """Validates `adapter_config.json` and returns the equivalent LoraConfig."""
  file = fileio.join(fileio.abspath(path), ADAPTER_CONFIG)
  ac = read_json(file, "PEFT adapter config")
  problems = []
  if ac.get("peft_type") != "LORA":
    problems.append(f"peft_type={ac.get('peft_type')!r} (only 'LORA')")
  if ac.get("task_type") not in (None, "CAUSAL_LM"):
    problems.append(f"task_type={ac.get('task_type')!r} (only 'CAUSAL_LM')")
  if ac.get("bias", "none") != "none":
    problems.append(f"bias={ac.get('bias')!r} (only 'none')")
  for key, what in _UNSUPPORTED.items():
    if _is_set(ac.get(key)):
      problems.append(f"{key}={ac[key]!r} ({what} is not supported)")
  init = ac.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
    problems.append(f"init_lora_weights={init!r} (it changes the base weights; convert the "
                    "adapter to plain LoRA with PEFT first)")
  for key in ("r", "lora_alpha", "target_modules"):
    if key not in ac:
      problems.append(f"missing key {key!r}")
  if problems:
    raise ValueError(f"{file}: unsupported adapter: " + "; ".join(problems))
  modules = _resolve_targets(ac["target_modules"], num_layers, file)
  try:
    return LoraConfig(rank=ac["r"], alpha=float(ac["lora_alpha"]),
                      dropout=float(ac.get("lora_dropout") or 0.0), targets=_targets_of(modules),
                      use_rslora=bool(ac.get("use_rslora", False)),
                      init="gaussian" if init == "gaussian" else "default")
  except (ValueError, TypeError) as e:
    raise ValueError(f"{file}: {e}") from None


def load_peft(path: str, config: LlamaConfig, params: Mapping,
              dtype: Any = None) -> tuple[LoraConfig, dict]:
  """Reads a PEFT adapter dir and returns (LoraConfig, params with `lora_a`/`lora_b` added).

  The adapter is checked against the model first (targets, rank, shapes, missing or extra
  tensors); every problem found is reported in one ValueError naming the file and keys.
  `dtype` casts the adapter (None keeps the file's dtype; base params are never touched). The
  LoRA leaves are host numpy arrays, like `load_hf`'s.
  """
  directory = fileio.abspath(path)
  lora = read_adapter_config(directory, config.num_hidden_layers)
  file = fileio.join(directory, ADAPTER_WEIGHTS)
  if not fileio.isfile(file):
    if fileio.isfile(fileio.join(directory, "adapter_model.bin")):
      raise FileNotFoundError(f"{file}: not found (only adapter_model.bin, a pickle; re-save with "
                              "save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{file}: file not found")
  with fileio.local_copy(file) as local, renamed(local, file):  # safe_open needs a local file
    return _fit_adapter(lora, local, file, config, params, dtype, directory)


def _fit_adapter(lora: LoraConfig, local: str, file: str, config: LlamaConfig, params: Mapping,
                 dtype: Any, directory: str) -> tuple[LoraConfig, dict]:
  """load_peft's checks and reads of the weights file `file` (staged at `local`)."""
  header = read_header(local)
  flat = traverse_util.flatten_dict(dict(params))
  if any(p[-1] in LORA_LEAVES for p in flat):
    raise ValueError(f"load_peft({directory}): params already hold LoRA leaves; pass base params")
  kernels = _kernel_shapes(params)
  r = lora.rank
  expected = {}
  for layer in range(config.num_hidden_layers):
    for module in lora.target_modules:
      for leaf in LORA_LEAVES:
        expected[peft_key(layer, module, leaf)] = (layer, module, leaf)
  by_path = {}
  unexpected, rank_errors, shape_errors, dtype_errors = [], [], [], []
  for key, (tag, shape) in header.items():
    p = peft_key_to_path(key)
    canonical = peft_key(int(p[0][len("layers_"):]), p[2], p[3]) if p else None
    if canonical not in expected or canonical in by_path:
      unexpected.append(key)
      continue
    by_path[canonical] = key
    layer, module, leaf = expected[canonical]
    if tag not in SUPPORTED_DTYPES:
      dtype_errors.append(f"{key}: {tag}")
    if (layer, module) not in kernels:
      shape_errors.append(f"{key}: the model params have no kernel for this module")
      continue
    d_in, d_out = kernels[(layer, module)]
    rank_axis, want = (0, [r, d_in]) if leaf == "lora_a" else (1, [d_out, r])
    if len(shape) != 2:
      shape_errors.append(f"{key}: shape {list(shape)}, expected {want}")
    elif shape[rank_axis] != r:
      rank_errors.append(f"{key}: rank {shape[rank_axis]} but {ADAPTER_CONFIG} says r={r}")
    elif list(shape) != want:
      shape_errors.append(f"{key}: shape {list(shape)}, the model's {module} implies {want} "
                          f"([r, in] for lora_A, [out, r] for lora_B)")
  missing = [k for k in expected if k not in by_path]
  sections = [("missing tensors", missing), ("unexpected tensors", unexpected),
              ("rank mismatches", rank_errors), ("shape mismatches", shape_errors),
              (f"unsupported dtypes (supported: {sorted(SUPPORTED_DTYPES)})", dtype_errors)]
  if any(items for _, items in sections):
    msg = "".join(f"\n  {t} ({len(i)}):{listed(i)}" for t, i in sections if i)
    raise ValueError(f"{file}: adapter does not fit this model (target_modules="
                     f"{list(lora.target_modules)}, r={r}):{msg}")
  cast = None if dtype is None else np.dtype(jnp.dtype(dtype))
  for canonical, key in by_path.items():
    layer, module, leaf = expected[canonical]
    x = read_tensor(local, key).T
    flat[(f"layers_{layer}", _GROUP[module], module, leaf)] = np.ascontiguousarray(
        x if cast is None else x.astype(cast))
  return lora, traverse_util.unflatten_dict(flat)
