"""Device mesh, logical -> mesh axis rules, and placement of params and batches.

The mesh has axes ("data", "fsdp", "tensor"). Params carry logical axis names
(`model.param_logical_axes`); `RULES` maps them to mesh axes: the embed dimension is sharded
over "fsdp" (ZeRO-3 style: frozen base weights too), MLP / heads / vocab over "tensor", the LoRA
rank never. Batches are split over ("data", "fsdp"). A dimension that its mesh axes do not divide
stays replicated, so the same code runs on 1 CPU device, 8 fake CPU devices and a TPU pod slice.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax.config.errors import require

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)


def mesh_axis_sizes(mesh_cfg: Mapping) -> list[int]:
  """The configured (data, fsdp, tensor) sizes; ConfigError naming mesh.* unless each is >= 1 or
  -1 (the remaining devices) and at most one is -1."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, sizes):
    require(s == -1 or s >= 1, f"mesh.{a}", f"must be >= 1 or -1, got {s}")
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  require(len(free) <= 1, f"mesh.{free[-1] if free else 'data'}",
          f"at most one mesh axis may be -1, got {free}")
  return sizes


def mesh_shape(mesh_cfg: Mapping, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with the -1 resolved; ConfigError naming mesh.* if it cannot fit."""
  sizes = mesh_axis_sizes(mesh_cfg)
  known = math.prod(s for s in sizes if s != -1)
  desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if -1 in sizes:
    require(num_devices % known == 0, "mesh",
            f"{desc}: the {num_devices} devices are not divisible by the fixed axes' product "
            f"{known}")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  total = math.prod(sizes)
  require(total == num_devices, "mesh",
          f"{desc}: mesh.data*fsdp*tensor = {total} does not match the {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over all (global) devices; `mesh_cfg` holds axis sizes."""
  devices = list(jax.devices() if devices is None else devices)
  mesh_cfg = mesh_cfg if mesh_cfg is not None else {"data": -1, "fsdp": 1, "tensor": 1}
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  """PartitionSpec for one array; non-divisible dims and reused mesh axes fall back to None."""
  if logical is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not flat or used & set(flat) or dim % _mesh_axis_size(mesh, flat):
      out.append(None)
      continue
    used.update(flat)
    out.append(axes)
  return P(*out)


def tree_shardings(shapes: Any, logical_axes: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs given its logical-axes tree.

  `logical_axes` may cover more leaves than `shapes` (e.g. the full model's axes for the
  trainable subtree): leaves are matched by path.
  """
  from flax import traverse_util
  flat_axes = traverse_util.flatten_dict(dict(logical_axes)) if logical_axes else {}
  flat_shapes = traverse_util.flatten_dict(dict(shapes))
  out = {}
  for path, x in flat_shapes.items():
    axes = flat_axes.get(path)
    axes = tuple(axes) if axes is not None else None
    out[path] = NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))
  return traverse_util.unflatten_dict(out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, L] arrays split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def data_parallel_size(mesh: Mesh) -> int:
  return _mesh_axis_size(mesh, BATCH_AXES)


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict:
  """Global jax.Arrays from this process's rows ([global_batch / process_count, L] each)."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_shape = (global_batch,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


def put_tree(tree: Any, shardings: Any) -> Any:
  """Places a host (or device) pytree with the given shardings (works multi-process when every
  process holds the full value, e.g. a base model loaded from disk on each host)."""
  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(place, tree, shardings)


def gather_to_host(tree: Any) -> Any:
  """Full numpy copies of a (possibly multi-host sharded) pytree on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
