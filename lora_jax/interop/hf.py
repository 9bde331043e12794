"""HF Llama checkpoints: `config.json` + safetensors (single file or sharded with an index).

HF stores linear weights [out, in]; Linen kernels are [in, out]. Everything else (embedding,
norm scales) has the same layout. Tensors are read one at a time with `safetensors.safe_open`, so
loading never holds a second full copy of the model. A remote directory (gs://...) is staged into
a local temp dir once (`fileio.local_copy`, safe_open needs a local file) and removed with the
HFTensors that read it; save_hf writes a remote `path` through `fileio.atomic_dir`.

  load_hf(path, dtype=None) -> (LlamaConfig, params)
  save_hf(path, config, params, max_shard_bytes=5 GiB, lora_config=None)
  open_hf_tensors(path) -> lazy Mapping: param path (tuple) or HF key -> numpy array (Linen layout)
  hf_key_to_path / path_to_hf_key: the key mapping
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from lora_jax import fileio
from lora_jax.config import LlamaConfig
from lora_jax.fileio import atomic_dir, listed, read_json, write_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What save_hf writes (and so may replace): the config, the weights, their shards and index.
OWNED_FILES = (CONFIG_FILE, SINGLE_FILE, "model-*-of-*.safetensors", INDEX_FILE)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# safetensors dtype tag <-> numpy dtype (bf16 via ml_dtypes, as jax uses).
SUPPORTED_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                    "BF16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_TAGS = {v: k for k, v in SUPPORTED_DTYPES.items()}
# HF buffers that are not parameters (older checkpoints saved RoPE's inv_freq).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_PROJ_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+_proj)\.weight$")
_NORM_RE = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_PROJ_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# --------------------------------------------------------------------------- key mapping
def hf_key_to_path(key: str) -> tuple[str, ...] | None:
  """`model.layers.0.self_attn.q_proj.weight` -> ("layers_0", "self_attn", "q_proj", "kernel").

  Returns None for keys that are not Llama parameters.
  """
  if key == "model.embed_tokens.weight":
    return ("embed_tokens", "embedding")
  if key == "model.norm.weight":
    return ("norm", "scale")
  if key == "lm_head.weight":
    return ("lm_head", "kernel")
  m = _PROJ_RE.match(key)
  if m and _PROJ_GROUP.get(m.group(3)) == m.group(2):
    return (f"layers_{m.group(1)}", m.group(2), m.group(3), "kernel")
  m = _NORM_RE.match(key)
  if m:
    return (f"layers_{m.group(1)}", m.group(2), "scale")
  return None


def path_to_hf_key(path: tuple[str, ...] | str) -> str:
  """Inverse of `hf_key_to_path` (also accepts "/"-joined paths); KeyError for non-Llama paths."""
  if isinstance(path, str):
    path = tuple(path.split("/"))
  path = tuple(path)
  if path == ("embed_tokens", "embedding"):
    return "model.embed_tokens.weight"
  if path == ("norm", "scale"):
    return "model.norm.weight"
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  if len(path) >= 3 and re.fullmatch(r"layers_\d+", path[0]):
    i = path[0][len("layers_"):]
    if len(path) == 4 and path[3] == "kernel" and _PROJ_GROUP.get(path[2]) == path[1]:
      return f"model.layers.{i}.{path[1]}.{path[2]}.weight"
    if len(path) == 3 and path[2] == "scale" and path[1] in ("input_layernorm",
                                                             "post_attention_layernorm"):
      return f"model.layers.{i}.{path[1]}.weight"
  raise KeyError(f"{'/'.join(path)} is not a Llama parameter path")


def is_transposed(path: tuple[str, ...]) -> bool:
  """Linear kernels are stored transposed in HF files ([out, in])."""
  return path[-1] == "kernel"


def _linen_shape(path, hf_shape) -> tuple[int, ...]:
  return tuple(reversed(hf_shape)) if path is not None and is_transposed(path) else tuple(hf_shape)


# --------------------------------------------------------------------------- reading
@contextlib.contextmanager
def safe_open_checked(file: str):
  """`safetensors.safe_open` (numpy) whose errors name the file."""
  from safetensors import safe_open
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: file not found")
  try:
    handle = safe_open(file, framework="numpy")
  except Exception as e:  # SafetensorError, OSError
    raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
  with handle as f:
    yield f


def read_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{key: (dtype tag, shape)} of a safetensors file, without reading any tensor data."""
  with safe_open_checked(file) as f:
    out = {}
    for k in f.keys():
      sl = f.get_slice(k)
      out[k] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    return out


def read_tensor(file: str, key: str) -> np.ndarray:
  with safe_open_checked(file) as f:
    try:
      return f.get_tensor(key)
    except Exception as e:
      raise ValueError(f"{file}: cannot read tensor {key!r}: {e}") from None


@contextlib.contextmanager
def renamed(local: str, shown: str):
  """Errors (OSError, ValueError) about the staged copy `local` name `shown`, the remote original.
  Only the plain types are rewritten (a subclass may take other constructor arguments)."""
  try:
    yield
  except (OSError, ValueError) as e:
    if local == shown or type(e) not in (OSError, FileNotFoundError, ValueError):
      raise
    raise type(e)(str(e).replace(local, shown)) from None


class HFTensors(Mapping):
  """Lazy, read-only view of an HF checkpoint directory's tensors.

  Keys are param paths (tuples, Linen names) for every Llama tensor in the files; lookups also
  accept HF keys (`model.norm.weight`). Values are numpy arrays in Linen layout ([in, out]
  kernels), read from disk one tensor per lookup. `hf_config` is the parsed `config.json` (None if
  absent), `unknown_keys` the HF keys that are neither Llama parameters nor ignored buffers.
  """

  def __init__(self, path: str):
    self.directory = fileio.abspath(path)
    if not fileio.isdir(self.directory):
      raise FileNotFoundError(f"{self.directory}: HF checkpoint directory not found")
    self._local = self.directory
    if fileio.is_remote(self.directory):  # safe_open needs a local file: stage the dir once
      stage = contextlib.ExitStack()
      self._local = stage.enter_context(fileio.local_copy(self.directory))
      weakref.finalize(self, stage.close)
    with renamed(self._local, self.directory):
      self._open()

  def _open(self) -> None:
    config_file = os.path.join(self._local, CONFIG_FILE)
    self.hf_config = read_json(config_file, "HF config") if os.path.isfile(config_file) else None
    self.index_file = None
    # hf key -> (local file, dtype tag, HF shape)
    self._entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    index = os.path.join(self._local, INDEX_FILE)
    single = os.path.join(self._local, SINGLE_FILE)
    if os.path.isfile(index):
      self.index_file = fileio.join(self.directory, INDEX_FILE)
      self._read_index(index)
    elif os.path.isfile(single):
      for k, (dt, shape) in read_header(single).items():
        self._entries[k] = (single, dt, shape)
    else:
      hint = ""
      if any(n.endswith(".bin") for n in os.listdir(self._local)):
        hint = (" (found PyTorch .bin weights; re-save them with "
                "`model.save_pretrained(dir, safe_serialization=True)`)")
      raise FileNotFoundError(f"{self._local}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    self._paths: dict[tuple[str, ...], str] = {}
    self.ignored_keys: list[str] = []
    self.unknown_keys: list[str] = []
    for k in self._entries:
      p = hf_key_to_path(k)
      if p is not None:
        self._paths[p] = k
      elif k.endswith(IGNORED_SUFFIXES):
        self.ignored_keys.append(k)
      else:
        self.unknown_keys.append(k)

  def _read_index(self, index: str) -> None:
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: missing or invalid key 'weight_map'")
    headers, errors = {}, []
    for name in sorted(set(weight_map.values())):
      file = os.path.join(self._local, str(name))
      if not os.path.isfile(file):
        errors.append(f"shard {name} listed in the index does not exist")
        continue
      headers[name] = read_header(file)
    for k, name in weight_map.items():
      if name not in headers:
        continue
      if k not in headers[name]:
        errors.append(f"{k}: listed in the index under {name} but absent from that file")
        continue
      self._entries[k] = (os.path.join(self._local, name),) + headers[name][k]
    if errors:
      raise ValueError(f"{index}: inconsistent sharded checkpoint:{listed(errors)}")

  # Mapping interface
  def _hf_key(self, key) -> str:
    if isinstance(key, tuple):
      if key not in self._paths:
        raise KeyError(key)
      return self._paths[key]
    if key in self._entries:
      return key
    raise KeyError(key)

  def __getitem__(self, key) -> np.ndarray:
    k = self._hf_key(key)
    with renamed(self._local, self.directory):
      arr = read_tensor(self._entries[k][0], k)
    path = hf_key_to_path(k)
    return arr.T if path is not None and is_transposed(path) else arr

  def __iter__(self) -> Iterator[tuple[str, ...]]:
    return iter(self._paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __contains__(self, key) -> bool:
    try:
      self._hf_key(key)
      return True
    except KeyError:
      return False

  def file_of(self, key) -> str:
    """The file (in `directory`, local or remote) that holds a tensor."""
    local = self._entries[self._hf_key(key)][0]
    return fileio.join(self.directory, os.path.relpath(local, self._local))

  def hf_key(self, key) -> str:
    return self._hf_key(key)

  def dtype_tag(self, key) -> str:
    """safetensors dtype tag ("F32", "BF16", ...) of a tensor, without reading it."""
    return self._entries[self._hf_key(key)][1]

  def shape(self, key) -> tuple[int, ...]:
    """Linen-layout shape of a tensor, without reading it."""
    k = self._hf_key(key)
    return _linen_shape(hf_key_to_path(k), self._entries[k][2])

  @property
  def config(self) -> LlamaConfig | None:
    return None if self.hf_config is None else config_from_hf_dict(
        self.hf_config, fileio.join(self.directory, CONFIG_FILE))


def open_hf_tensors(path: str) -> HFTensors:
  """A lazy read-only Mapping over an HF checkpoint dir (see `HFTensors`)."""
  return HFTensors(path)


def config_from_hf_dict(hf: dict, file: str) -> LlamaConfig:
  """`LlamaConfig.from_hf` with checks for features this Llama does not implement."""
  problems = []
  if hf.get("model_type", "llama") != "llama":
    problems.append(f"model_type={hf.get('model_type')!r} (only 'llama' is supported)")
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      problems.append(f"{key}=true (biases are not supported)")
  if problems:
    raise ValueError(f"{file}: unsupported config: " + "; ".join(problems))
  try:
    return LlamaConfig.from_hf(hf)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{file}: {e}") from None


def _expected_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from lora_jax.model import param_shapes
  flat = traverse_util.flatten_dict(param_shapes(config))
  return {p: tuple(s.shape) for p, s in flat.items()}


def _dtype_or_none(dtype) -> np.dtype | None:
  return None if dtype is None else np.dtype(jnp.dtype(dtype))


def load_hf(path: str, dtype: Any = None) -> tuple[LlamaConfig, dict]:
  """Reads an HF Llama dir into (LlamaConfig, params) with Linen layout.

  Params are numpy arrays in host memory (jax accepts them; place them with `jax.device_put`
  or a sharding), so a model larger than one device can be loaded and then sharded.
  `dtype` casts every param (None keeps each tensor's file dtype). The returned config's
  `param_dtype` is the embedding's dtype; its compute `dtype` stays the default (float32).
  All problems (missing / unexpected keys, shape mismatches, unsupported dtypes) are reported
  together in one ValueError.
  """
  tensors = open_hf_tensors(path)
  if tensors.hf_config is None:
    raise FileNotFoundError(f"{fileio.join(tensors.directory, CONFIG_FILE)}: HF config not found")
  config = tensors.config
  expected = _expected_shapes(config)
  where = tensors.index_file or fileio.join(tensors.directory, SINGLE_FILE)
  tied_head = ("lm_head", "kernel") if config.tie_word_embeddings and (
      ("lm_head", "kernel") in tensors) else None
  missing = [path_to_hf_key(p) for p in expected if p not in tensors]
  unexpected = [tensors.hf_key(p) for p in tensors if p not in expected and p != tied_head]
  unexpected += tensors.unknown_keys
  mismatched, bad_dtypes = [], []
  for p in tensors:
    k, tag = tensors.hf_key(p), tensors.dtype_tag(p)
    if tag not in SUPPORTED_DTYPES:
      bad_dtypes.append(f"{k}: {tag} in {os.path.basename(tensors.file_of(p))}")
    want = expected.get(p)
    if p == tied_head:  # [D, V], the embedding's transpose
      want = expected[("embed_tokens", "embedding")][::-1]
    if want is not None and tensors.shape(p) != want:
      hf_want = list(reversed(want)) if is_transposed(p) else list(want)
      mismatched.append(f"{k}: file has {list(tensors._entries[k][2])}, config "
                        f"{tensors.directory}/{CONFIG_FILE} implies {hf_want}")
  sections = [("missing keys", missing), ("unexpected keys", unexpected),
              ("shape mismatches", mismatched),
              (f"unsupported dtypes (supported: {sorted(SUPPORTED_DTYPES)})", bad_dtypes)]
  if any(items for _, items in sections):
    msg = "".join(f"\n  {title} ({len(items)}):{listed(items)}" for title, items in sections if items)
    raise ValueError(f"{where}: does not match a Llama with this config:{msg}")

  cast = _dtype_or_none(dtype)
  flat, embed_raw = {}, None
  for p in expected:
    raw = tensors[p]  # one tensor in host memory at a time
    if tied_head is not None and p == ("embed_tokens", "embedding"):
      embed_raw = raw
    # Host numpy, contiguous in Linen layout; the caller places it (device_put / sharding).
    flat[p] = np.ascontiguousarray(raw if cast is None else raw.astype(cast))
    del raw
  if tied_head is not None:
    if not np.array_equal(tensors[tied_head].T, embed_raw):
      raise ValueError(f"{tensors.file_of(tied_head)}: tie_word_embeddings is true in "
                       f"{CONFIG_FILE} but lm_head.weight differs from model.embed_tokens.weight")
    del embed_raw
  config = config.replace(param_dtype=str(np.dtype(flat[("embed_tokens", "embedding")].dtype)))
  return config, traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- writing
def _hf_order(path: tuple[str, ...]) -> tuple:
  """Embeddings, then layers in order, then the final norm and the head."""
  if path[0] == "embed_tokens":
    return (0, 0, "")
  if path[0].startswith("layers_"):
    return (1, int(path[0][len("layers_"):]), "/".join(path[1:]))
  return (2, 0, "/".join(path))


def plan_shards(sizes: list[tuple[Any, int]], max_shard_bytes: int) -> list[list[Any]]:
  """Greedy split of (item, nbytes) in order into shards of at most max_shard_bytes (a bigger
  item gets a shard of its own)."""
  shards, current, used = [], [], 0
  for item, n in sizes:
    if current and used + n > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(item)
    used += n
  if current:
    shards.append(current)
  return shards


def _check_params(config: LlamaConfig, flat: dict, what: str) -> None:
  expected = _expected_shapes(config)
  missing = ["/".join(p) for p in expected if p not in flat]
  unexpected = ["/".join(p) for p in flat if p not in expected]
  mismatched = [f"{'/'.join(p)}: {list(flat[p].shape)}, config implies {list(expected[p])}"
                for p in expected if p in flat and tuple(flat[p].shape) != expected[p]]
  bad_dtypes = [f"{'/'.join(p)}: {np.dtype(x.dtype)}" for p, x in flat.items()
                if np.dtype(x.dtype) not in _DTYPE_TAGS]
  sections = [("missing params", missing), ("unexpected params", unexpected),
              ("shape mismatches", mismatched),
              ("unsupported dtypes (use float32, float16 or bfloat16)", bad_dtypes)]
  if any(items for _, items in sections):
    msg = "".join(f"\n  {t} ({len(i)}):{listed(i)}" for t, i in sections if i)
    raise ValueError(f"{what}: params do not match the config:{msg}")


def save_hf(path: str, config: LlamaConfig, params: Mapping,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, lora_config=None,
            overwrite: bool = False) -> str:
  """Writes `config.json` + `model.safetensors` (or shards + index) atomically; returns the path.

  Each tensor keeps its dtype (a `load_hf` round trip is bit-exact). Params with LoRA leaves are
  refused unless `lora_config` is given, in which case they are merged (W + scale A B) first.
  A `path` holding files save_hf does not write (a tokenizer, a README) is refused unless
  `overwrite`, which replaces only save_hf's own files and keeps the others (`fileio.atomic_dir`).
  """
  from lora_jax.lora import LORA_LEAVES, merge_lora
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
  flat = traverse_util.flatten_dict(dict(params))
  lora_paths = ["/".join(p) for p in flat if p[-1] in LORA_LEAVES]
  if lora_paths:
    if lora_config is None:
      raise ValueError(f"save_hf({path}): params hold LoRA leaves (e.g. {lora_paths[0]}); merge "
                       "them first with lora_jax.merge_lora(params, lora_config), or pass "
                       "lora_config= to save_hf, or export the adapter with save_peft")
    flat = traverse_util.flatten_dict(merge_lora(params, lora_config))
  _check_params(config, flat, f"save_hf({path})")
  order = sorted(flat, key=_hf_order)
  sizes = [(p, int(np.prod(flat[p].shape)) * np.dtype(flat[p].dtype).itemsize) for p in order]
  shards = plan_shards(sizes, max_shard_bytes)
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                        for i in range(n)]
  hf = config.to_hf()
  dtype_name = str(np.dtype(flat[("embed_tokens", "embedding")].dtype))
  hf["torch_dtype"] = hf["dtype"] = dtype_name
  from safetensors.numpy import save_file
  with atomic_dir(path, OWNED_FILES, overwrite=overwrite) as tmp:
    write_json(os.path.join(tmp, CONFIG_FILE), hf)
    weight_map = {}
    for name, shard in zip(names, shards):
      tensors = {}
      for p in shard:
        x = np.asarray(jax.device_get(flat[p]))
        tensors[path_to_hf_key(p)] = np.ascontiguousarray(x.T if is_transposed(p) else x)
        weight_map[path_to_hf_key(p)] = name
      save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
      del tensors
    if n > 1:
      write_json(os.path.join(tmp, INDEX_FILE), {
          "metadata": {"total_size": sum(s for _, s in sizes),
                       "total_parameters": sum(int(np.prod(flat[p].shape)) for p in order)},
          "weight_map": dict(sorted(weight_map.items()))})
  return fileio.abspath(path)
