"""Training checkpoints (orbax CheckpointManager), the run's config.json, and base fingerprints.

Layout of `output_dir` (a local directory or a gs:// prefix: orbax writes either through
etils.epath and tensorstore; on an object store a step is complete once orbax's
commit_success.txt is in it):

  config.json                  the run config (checked on resume; a different one is refused)
  checkpoints/<step>/state     TrainState: step, trainable params (LoRA leaves only for LoRA runs),
                               optimizer state, RNG key (orbax, async, sharded)
  checkpoints/<step>/data      data-iterator state, one JSON per process
  checkpoints/<step>/meta      tokens seen, bad steps, the base pointer (preset / hf_path + a
                               fingerprint of the frozen base weights)

The last `keep` checkpoints are kept, plus the best one by an eval metric when given.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lora_jax import fileio

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------- small files
def dumps(x: Any) -> str:
  """The format of config.json and the checkpoint's JSON items."""
  return fileio.dumps(x, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- data state handler
class DataStateHandler(ocp.CheckpointHandler):
  """Saves each process's data-iterator state as `process_<i>-of-<n>.json` (like grain's)."""

  def _file(self, directory) -> epath.Path:
    return epath.Path(directory) / (
        f"process_{jax.process_index()}-of-{jax.process_count()}.json")

  def save(self, directory, args: "DataStateSave"):
    self._file(directory).write_text(dumps(args.state))

  def restore(self, directory, args: "DataStateRestore" = None):
    f = self._file(directory)
    if not f.exists():
      raise FileNotFoundError(f"{f}: no data-iterator state for this process (was the run "
                              f"saved with a different number of processes?)")
    return fileio.loads(f.read_text())

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# --------------------------------------------------------------------------- fingerprints
def _leaf_sums(x):
  if x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  idx = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0)
  for d in range(1, x.ndim):
    idx = idx * jnp.uint32(x.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
  w = idx * jnp.uint32(2654435761) + jnp.uint32(1)
  # Integer sums wrap mod 2^32 and are associative: the result is exact whatever the sharding.
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * w, dtype=jnp.uint32)])


def fingerprint_sums(tree: Any) -> Any:
  """Per-leaf uint32 [2] checksums (traceable: usable inside a jitted init)."""
  return jax.tree.map(_leaf_sums, tree)


def fingerprint_from_sums(tree: Any, sums: Any) -> str:
  """A short hash of paths, shapes, dtypes and `fingerprint_sums(tree)`."""
  h = hashlib.sha256()
  sums = jax.device_get(sums)
  items = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_sums = dict((jax.tree_util.keystr(p), v)
                   for p, v in jax.tree_util.tree_flatten_with_path(sums)[0])
  for path, x in sorted(items, key=lambda kv: jax.tree_util.keystr(kv[0])):
    k = jax.tree_util.keystr(path)
    s1, s2 = (int(v) for v in np.asarray(flat_sums[k]))
    h.update(f"{k}|{tuple(x.shape)}|{np.dtype(x.dtype)}|{s1}|{s2};".encode())
  return h.hexdigest()[:16]


# --------------------------------------------------------------------------- manager
def _best_fn(metrics):
  return float(metrics["best"])


def make_manager(output_dir: str, *, keep: int, async_save: bool = True,
                 best_mode: str | None = None, keep_steps=()) -> ocp.CheckpointManager:
  """CheckpointManager under output_dir/checkpoints keeping the last `keep`, the `keep_steps`,
  and the best one by the saved metric when `best_mode` is "min" / "max"."""
  from orbax.checkpoint import checkpoint_managers as cm
  policies = [cm.LatestN(n=keep)]
  if keep_steps:
    policies.append(cm.CustomSteps(steps=list(keep_steps)))
  if best_mode:
    policies.append(cm.BestN(get_metric_fn=_best_fn, reverse=best_mode == "min", n=1,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(fileio.abspath(fileio.join(output_dir, CHECKPOINT_DIR)),
                               item_names=tuple(handlers), item_handlers=handlers,
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any, meta: dict,
         best: float | None = None) -> bool:
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=DataStateSave(data_state),
                            meta=ocp.args.JsonSave(fileio.jsonable(meta)))
  metrics = {"best": best} if best is not None else None
  return manager.save(step, args=args, metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, Any, dict]:
  """(state, data_state, meta) of checkpoint `step`, placed with abstract_state's shardings."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["data"], out["meta"]


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
