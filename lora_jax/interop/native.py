"""The lora-jax checkpoint format, and `load_model`, which opens any supported model directory.

A lora-jax checkpoint is a directory holding

  lora_jax.json   {"format": "lora-jax", "format_version": 1, "model": LlamaConfig fields,
                   "lora": LoraConfig fields or null, "metadata": {...}}
  params/         the params pytree (LoRA leaves included), saved with orbax

`load_model(path, adapter=None)` detects the kind of directory: an HF dir (`config.json`), a
lora-jax checkpoint (`lora_jax.json`) or a PEFT adapter (`adapter_config.json`, whose base comes
from its `base_model_name_or_path` when that is a directory, local or gs://).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import fileio
from lora_jax.config import LlamaConfig
from lora_jax.fileio import atomic_dir, read_json, write_json
from lora_jax.lora import LoraConfig

META_FILE = "lora_jax.json"
PARAMS_DIR = "params"
OWNED_FILES = (META_FILE, PARAMS_DIR)  # what save_checkpoint writes (and so may replace)
FORMAT = "lora-jax"
FORMAT_VERSION = 1


def _config_to_json(config) -> dict:
  d = dataclasses.asdict(config)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _config_from_json(cls, d: Any, file: str, key: str):
  if not isinstance(d, dict):
    raise ValueError(f"{file}: key {key!r} must be an object, got {type(d).__name__}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"{file}: unknown fields in {key!r}: {unknown}")
  try:
    return cls(**d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{file}: invalid {key!r}: {e}") from None


def save_checkpoint(path: str, config: LlamaConfig, params: Mapping,
                    lora_config: LoraConfig | None = None, metadata: dict | None = None,
                    *, overwrite: bool = False) -> str:
  """Writes a lora-jax checkpoint dir atomically; returns its absolute path.

  `metadata` (JSON-serializable) is stored as is, e.g. {"base_model_name_or_path": ...}.
  """
  from lora_jax.lora import has_lora
  if has_lora(params) and lora_config is None:
    raise ValueError(f"save_checkpoint({path}): params hold LoRA leaves; pass lora_config=")
  if lora_config is not None and not has_lora(params):
    raise ValueError(f"save_checkpoint({path}): lora_config given but params hold no LoRA leaves")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": _config_to_json(config),
          "lora": None if lora_config is None else _config_to_json(lora_config),
          "metadata": dict(metadata or {})}
  with atomic_dir(path, OWNED_FILES, overwrite=overwrite) as tmp:
    import orbax.checkpoint as ocp
    with _checkpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(dict(params)))
    write_json(os.path.join(tmp, META_FILE), meta)  # last: its presence marks a complete dir
  return fileio.abspath(path)


def read_checkpoint_info(path: str) -> dict:
  """The validated `lora_jax.json` of a checkpoint dir."""
  file = fileio.join(fileio.abspath(path), META_FILE)
  meta = read_json(file, "lora-jax checkpoint metadata")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{file}: key 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{file}: format_version {version!r} is not supported by this lora-jax "
                     f"(reads version {FORMAT_VERSION})")
  if "model" not in meta:
    raise ValueError(f"{file}: missing key 'model'")
  return meta


def load_checkpoint(path: str, dtype: Any = None) -> tuple[LlamaConfig, dict, LoraConfig | None]:
  """Reads a lora-jax checkpoint: (config, params, lora_config or None).

  Params are numpy arrays in host memory (place them with `jax.device_put` or a sharding);
  `dtype` casts them on restore (None keeps the saved dtypes) and sets `config.param_dtype`.
  """
  directory = fileio.abspath(path)
  file = fileio.join(directory, META_FILE)
  meta = read_checkpoint_info(directory)
  config = _config_from_json(LlamaConfig, meta["model"], file, "model")
  lora = None if meta.get("lora") is None else _config_from_json(
      LoraConfig, meta["lora"], file, "lora")
  params_dir = fileio.join(directory, PARAMS_DIR)
  if not fileio.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir}: params directory of the checkpoint not found")
  # A remote checkpoint is staged locally once (read whole anyway); errors name the remote dir.
  with fileio.local_copy(params_dir) as local, _checkpointer() as checkpointer:
    tree = _restore(checkpointer, local, dtype, shown=params_dir)
  params = jax.tree.map(np.asarray, tree)
  _check_against_config(config, lora, params, file)
  leaf = params["embed_tokens"]["embedding"]
  return config.replace(param_dtype=str(np.dtype(leaf.dtype))), params, lora


def _checkpointer():
  """A synchronous orbax checkpointer (nothing is left running in the background)."""
  import orbax.checkpoint as ocp
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _restore(checkpointer, params_dir: str, dtype: Any, shown: str) -> dict:
  bad = f"{shown}: cannot restore the checkpoint params (corrupt or incomplete?)"
  try:
    meta = checkpointer.metadata(params_dir)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
    raise ValueError(f"{bad}: unreadable orbax metadata: {type(e).__name__}: {e}") from None
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
  if not isinstance(tree, dict):
    raise ValueError(f"{bad}: the orbax metadata (_METADATA) is missing or unreadable")
  import orbax.checkpoint as ocp
  cast = None if dtype is None else np.dtype(jnp.dtype(dtype))
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=cast),
                              tree)
  try:
    return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001 - tensorstore errors for damaged data files
    first = (str(e).splitlines() or [""])[0][:300]
    raise ValueError(f"{bad}: {type(e).__name__}: {first}") from None


def _check_against_config(config, lora, params, file) -> None:
  from flax import traverse_util
  from lora_jax.model import param_shapes
  want = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(
      param_shapes(config, lora)).items()}
  got = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(params).items()}
  if want != got:
    missing = sorted("/".join(p) for p in set(want) - set(got))
    extra = sorted("/".join(p) for p in set(got) - set(want))
    shapes = sorted(f"{'/'.join(p)}: {list(got[p])} vs {list(want[p])}"
                    for p in set(want) & set(got) if want[p] != got[p])
    raise ValueError(f"{file}: saved params do not match the configs in it: missing "
                     f"{missing[:10]}, unexpected {extra[:10]}, shape mismatches {shapes[:10]}")


# --------------------------------------------------------------------------- any directory
def detect_format(path: str) -> str:
  """"hf", "lora-jax" or "peft" for a model directory; ValueError otherwise."""
  directory = fileio.abspath(path)
  if not fileio.isdir(directory):
    raise FileNotFoundError(f"{directory}: model directory not found")
  from lora_jax.interop import hf, peft
  for marker, kind in ((META_FILE, "lora-jax"), (peft.ADAPTER_CONFIG, "peft"),
                       (hf.CONFIG_FILE, "hf")):
    if fileio.isfile(fileio.join(directory, marker)):
      return kind
  raise ValueError(f"{directory}: not a model directory (no {META_FILE}, "
                   f"{peft.ADAPTER_CONFIG} or {hf.CONFIG_FILE})")


def load_model(path: str, adapter: str | None = None,
               dtype: Any = None) -> tuple[LlamaConfig, dict, LoraConfig | None]:
  """Loads an HF dir, a lora-jax checkpoint, or a PEFT adapter on its base.

  With `adapter=`, `path` is the base (HF dir or lora-jax checkpoint without LoRA) and `adapter`
  a PEFT adapter dir. A PEFT dir given as `path` uses `base_model_name_or_path` from its
  `adapter_config.json` when that is a directory (local or gs://). Returns (config, params,
  lora or None).
  """
  from lora_jax.interop import hf, peft
  kind = detect_format(path)
  if kind == "peft":
    if adapter is not None:
      raise ValueError(f"{path} is a PEFT adapter; pass the base model as path and the adapter "
                       "as adapter=")
    file = fileio.join(fileio.abspath(path), peft.ADAPTER_CONFIG)
    base = read_json(file, "PEFT adapter config").get("base_model_name_or_path")
    base = base and (str(base) if fileio.is_remote(str(base)) else os.path.expanduser(str(base)))
    if not base or not fileio.isdir(base):
      raise ValueError(f"{file}: base_model_name_or_path={base!r} is not a local directory "
                       "or a gs:// one; "
                       f"pass the base explicitly: load_model(BASE_DIR, adapter={path!r})")
    return load_model(base, adapter=path, dtype=dtype)
  if kind == "hf":
    config, params = hf.load_hf(path, dtype=dtype)
    lora = None
  else:
    config, params, lora = load_checkpoint(path, dtype=dtype)
  if adapter is None:
    return config, params, lora
  if lora is not None:
    raise ValueError(f"{path}: this checkpoint already holds LoRA adapters; cannot add {adapter}")
  if detect_format(adapter) != "peft":
    raise ValueError(f"{adapter}: not a PEFT adapter dir (no {peft.ADAPTER_CONFIG})")
  lora, params = peft.load_peft(adapter, config, params, dtype=dtype)
  return config, params, lora
