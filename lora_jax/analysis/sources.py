"""Where analyzed weights come from: one matrix at a time, in Linen layout [in, out], float32.

A `WeightSource` answers `kernel(layer, module)` and `lora(layer, module)` (the LoRA factors
(A [in, R], B [R, out], scale) or None). Implementations:

  ParamsSource   an in-memory lora-jax params pytree (optionally with LoRA leaves + LoraConfig)
  HFSource       an HF Llama directory, read lazily tensor by tensor (`interop.hf.open_hf_tensors`)
  PeftSource     a PEFT LoRA adapter directory on top of a base source (its factors + scale)

`open_source(x, base=None)` picks one: a params dict, an HF dir (config.json + *.safetensors), a
PEFT adapter dir (adapter_config.json; needs `base`), or a lora-jax checkpoint
(`interop.native.load_model`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Protocol

import numpy as np

from lora_jax import fileio
from lora_jax.lora import ALL_MODULES, ATTENTION_MODULES, LoraConfig

_LAYER_RE = re.compile(r"^layers_(\d+)$")
_PEFT_KEY_RE = re.compile(
    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")


def module_group(module: str) -> str:
  """"self_attn" or "mlp": the params subtree holding `module`."""
  if module not in ALL_MODULES:
    raise ValueError(f"unknown module {module!r}; choose from {list(ALL_MODULES)}")
  return "self_attn" if module in ATTENTION_MODULES else "mlp"


def _f32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32, copy=False)


class WeightSource(Protocol):
  name: str
  num_layers: int

  def kernel(self, layer: int, module: str) -> np.ndarray: ...

  def lora(self, layer: int, module: str) -> tuple[np.ndarray, np.ndarray, float] | None: ...


class ParamsSource:
  """Matrices from a lora-jax params pytree (nested dicts; `{"params": ...}` is unwrapped)."""

  def __init__(self, params: Mapping, lora_config: LoraConfig | None = None, name: str = "params"):
    if set(params) == {"params"}:
      params = params["params"]
    self.params, self.lora_config, self.name = params, lora_config, name
    layers = sorted(int(m.group(1)) for k in params if (m := _LAYER_RE.match(str(k))))
    if not layers:
      raise ValueError(f"{name}: no layers_{{i}} subtrees in params (keys: {sorted(params)[:8]})")
    self.num_layers = layers[-1] + 1

  def _module(self, layer: int, module: str) -> Mapping:
    try:
      return self.params[f"layers_{layer}"][module_group(module)][module]
    except KeyError:
      raise KeyError(f"{self.name}: no layers_{layer}/{module_group(module)}/{module}") from None

  def kernel(self, layer, module):
    return _f32(self._module(layer, module)["kernel"])

  def shape(self, layer, module) -> tuple[int, int]:
    return tuple(np.shape(self._module(layer, module)["kernel"]))

  def lora(self, layer, module):
    mod = self._module(layer, module)
    if "lora_a" not in mod:
      return None
    if self.lora_config is None:
      raise ValueError(f"{self.name}: params hold LoRA leaves but no LoraConfig was given "
                       "(its scale alpha/r is needed)")
    return _f32(mod["lora_a"]), _f32(mod["lora_b"]), float(self.lora_config.scale)


class HFSource:
  """Matrices from an HF Llama directory, one tensor at a time (never the whole model)."""

  def __init__(self, path: str):
    try:
      from lora_jax.interop import hf
      open_hf_tensors = hf.open_hf_tensors
    except (ImportError, AttributeError) as e:
      raise RuntimeError("reading HF directories needs lora_jax.interop.hf.open_hf_tensors, "
                         f"which is not available yet ({e})") from e
    self.name = path
    config = fileio.read_json(fileio.join(path, "config.json"), "HF config")
    self.num_layers = int(config["num_hidden_layers"])
    self.tensors = open_hf_tensors(path)

  def _key(self, layer, module):
    return (f"layers_{layer}", module_group(module), module, "kernel")

  def kernel(self, layer, module):
    return _f32(self.tensors[self._key(layer, module)])

  def shape(self, layer, module) -> tuple[int, int]:
    return tuple(self.tensors.shape(self._key(layer, module)))  # header only, no read

  def lora(self, layer, module):
    return None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a (small) safetensors file, local or gs://, as float32 numpy arrays (bfloat16
  included)."""
  from safetensors import safe_open
  out = {}
  # safe_open needs a local file; flax: bfloat16-capable (numpy is not)
  with fileio.local_copy(path) as local, safe_open(local, framework="flax") as f:
    for key in f.keys():
      out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return out


def peft_scale(adapter_config: Mapping[str, Any]) -> float:
  """PEFT's scaling: lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))."""
  r, alpha = adapter_config["r"], adapter_config.get("lora_alpha", adapter_config["r"])
  return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


class PeftSource:
  """W_ft = W_base + scale * A B with the factors of a PEFT LoRA adapter directory.

  PEFT stores lora_A [R, in] and lora_B [out, R]; they are transposed to lora-jax's A [in, R],
  B [R, out]. Per-module rank/alpha overrides (`rank_pattern` / `alpha_pattern`) are honoured.
  """

  def __init__(self, path: str, base: WeightSource):
    self.config = fileio.read_json(fileio.join(path, "adapter_config.json"), "PEFT adapter config")
    if str(self.config.get("peft_type", "LORA")).upper() != "LORA":
      raise ValueError(f"{path}: peft_type {self.config.get('peft_type')!r} is not LORA")
    weights = fileio.join(path, "adapter_model.safetensors")
    if not fileio.exists(weights):
      raise FileNotFoundError(f"{path}: adapter_model.safetensors not found")
    self.name, self.base, self.num_layers = path, base, base.num_layers
    self.factors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in read_safetensors(weights).items():
      m = _PEFT_KEY_RE.search(key)
      if m:
        self.factors.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    if not self.factors:
      raise ValueError(f"{path}: no lora_A / lora_B tensors of Llama projections found")

  def _scale(self, layer: int, module: str, rank: int) -> float:
    cfg = dict(self.config, r=rank)
    for pattern, alpha in (self.config.get("alpha_pattern") or {}).items():
      if re.search(pattern, f"layers.{layer}.{module}"):
        cfg["lora_alpha"] = alpha
    return peft_scale(cfg)

  def kernel(self, layer, module):
    return self.base.kernel(layer, module)

  def shape(self, layer, module) -> tuple[int, int]:
    return kernel_shape(self.base, layer, module)

  def lora(self, layer, module):
    f = self.factors.get((layer, module))
    if f is None:
      return None
    a_RxI, b_OxR = f["A"], f["B"]
    return a_RxI.T, b_OxR.T, self._scale(layer, module, a_RxI.shape[0])


def kernel_shape(source: WeightSource, layer: int, module: str) -> tuple[int, int]:
  """[in, out] of a kernel, from metadata when the source can (else by reading it)."""
  if hasattr(source, "shape"):
    return source.shape(layer, module)
  return source.kernel(layer, module).shape


def is_hf_dir(path: str) -> bool:
  return (fileio.isfile(fileio.join(path, "config.json"))
          and any(n.endswith(".safetensors") for n in fileio.listdir(path)))


def is_peft_dir(path: str) -> bool:
  return fileio.isfile(fileio.join(path, "adapter_config.json"))


def open_source(x: Any, base: WeightSource | None = None, lora_config: LoraConfig | None = None,
                name: str | None = None) -> WeightSource:
  """A WeightSource for a params dict, an HF dir, a PEFT adapter dir (on `base`) or a checkpoint."""
  if hasattr(x, "kernel") and hasattr(x, "lora"):
    return x
  if isinstance(x, Mapping):
    return ParamsSource(x, lora_config, name or "params")
  path = os.fspath(x)
  if not fileio.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if is_peft_dir(path):
    if base is None:
      raise ValueError(f"{path} is a PEFT adapter; give the base model it was trained on")
    return PeftSource(path, base)
  if is_hf_dir(path):
    return HFSource(path)
  try:
    from lora_jax.interop import native
    load_model = native.load_model
  except (ImportError, AttributeError) as e:
    raise RuntimeError(f"{path} is neither an HF dir nor a PEFT adapter, and lora-jax checkpoints "
                       f"need lora_jax.interop.native.load_model (not available yet: {e})") from e
  _, params, lora = load_model(path)
  return ParamsSource(params, lora, name or path)
