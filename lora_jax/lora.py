"""Functional LoRA: extra leaves in the params pytree, a label tree, and merge / unmerge.

A targeted projection's params hold `kernel` [in, out] (frozen) plus `lora_a` [in, R] and
`lora_b` [R, out] (trainable). The forward pass is

    y = x W + dropout(x) A B * scale,   scale = alpha / R   (rsLoRA: alpha / sqrt(R))

with A Kaiming-uniform (as PEFT) and B = 0, so a freshly adapted model equals its base exactly.
`trainable_labels` marks leaves "trainable" / "frozen" by path patterns; `split_params` separates
the two subtrees so `jax.grad` only differentiates the trainable one (no gradient or optimizer
buffers exist for frozen weights); `optax_mask` offers the same partition to `optax.multi_transform`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lora_jax.config.errors import require

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
SHORTHANDS = {"attention": ATTENTION_MODULES, "attn": ATTENTION_MODULES, "mlp": MLP_MODULES,
              "all": ALL_MODULES}
TRAINABLE, FROZEN = "trainable", "frozen"
LORA_LEAVES = ("lora_a", "lora_b")
_INITS = ("default", "gaussian", "pissa")


def _as_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    targets = [t for t in re.split(r"[,\s]+", targets) if t]
  return tuple(targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters. `targets` are PEFT module names or "attention" / "mlp" / "all"."""
  rank: int = 16
  alpha: float | None = None  # None -> 2 * rank (the paper's choice)
  dropout: float = 0.0
  targets: tuple[str, ...] | str = ("all",)
  use_rslora: bool = False
  init: str = "default"  # "default" (Kaiming-uniform A, zero B), "gaussian", or "pissa"

  def __post_init__(self):
    object.__setattr__(self, "targets", _as_targets(self.targets))
    # ConfigError is a ValueError that names the run-config key (lora.rank, ...).
    rank_is_int = isinstance(self.rank, (int, np.integer)) and not isinstance(self.rank, bool)
    require(rank_is_int, "lora.rank", f"must be an integer, got {self.rank!r}")
    require(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank!r}")
    require(self.alpha is None or self.alpha > 0, "lora.alpha",
            f"must be > 0, got {self.alpha!r}")
    require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
    require(self.init in _INITS, "lora.init", f"must be one of {_INITS}, got {self.init!r}")
    require(bool(self.targets), "lora.targets",
            "is empty; name modules (q_proj, ...) or 'attention'/'mlp'/'all'")
    for t in self.targets:
      require(t in SHORTHANDS or t in ALL_MODULES, "lora.targets",
              f"{t!r} matches no module; valid names are {list(ALL_MODULES)} and shorthands "
              f"{sorted(SHORTHANDS)}")

  @property
  def lora_alpha(self) -> float:
    return float(self.alpha if self.alpha is not None else 2 * self.rank)

  @property
  def scale(self) -> float:
    r = math.sqrt(self.rank) if self.use_rslora else self.rank
    return self.lora_alpha / r

  @property
  def target_modules(self) -> tuple[str, ...]:
    """Targets with shorthands expanded, in canonical module order."""
    names = set()
    for t in self.targets:
      names.update(SHORTHANDS.get(t, (t,)))
    return tuple(m for m in ALL_MODULES if m in names)

  def replace(self, **kwargs) -> "LoraConfig":
    return dataclasses.replace(self, **kwargs)


def kaiming_uniform_a(key, shape, dtype=jnp.float32):
  """PEFT's `kaiming_uniform_(a=sqrt(5))` on the [R, in] weight: U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _a_init(lora: LoraConfig):
  if lora.init == "gaussian":
    return lambda key, shape, dtype=jnp.float32: (
        jax.random.normal(key, shape, dtype) / lora.rank)
  return kaiming_uniform_a


class LoraDense(nn.Module):
  """A bias-free Dense whose kernel may carry a LoRA branch (when its name is targeted).

  `params_only=True` returns (kernel, lora_a or None, lora_b or None) without computing: on CPU
  the model runs projections that share an input as one group (`lora_jax.ops.project`).
  """
  features: int
  kernel_axes: tuple[str, str]
  lora: LoraConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def adapted(self) -> bool:
    return self.lora is not None and self.name in self.lora.target_modules

  @nn.compact
  def __call__(self, x, deterministic: bool = True, params_only: bool = False):
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), self.kernel_axes), (d_in, self.features), self.param_dtype)
    a = b = None
    if self.adapted:
      lora = self.lora
      a = self.param("lora_a", nn.with_logical_partitioning(
          _a_init(lora), (self.kernel_axes[0], "lora_rank")), (d_in, lora.rank), self.param_dtype)
      b = self.param("lora_b", nn.with_logical_partitioning(
          nn.initializers.zeros, ("lora_rank", self.kernel_axes[1])),
          (lora.rank, self.features), self.param_dtype)
    if params_only:
      return kernel, a, b
    # Matmuls on 2-D [tokens, in] operands: with a [B, L, in] operand XLA:CPU lays out the
    # weight-gradient dot with a transposed [out, B*L] copy of the incoming gradient, a full extra
    # pass over the largest operand of the product.
    lead = x.shape[:-1]
    x = x.reshape(-1, d_in).astype(self.dtype)
    y = x @ kernel.astype(self.dtype)
    if a is None:
      return y.reshape(lead + (self.features,))
    if self.lora.dropout > 0:
      x = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
    y = y + ((x @ a.astype(self.dtype)) @ b.astype(self.dtype)) * jnp.asarray(
        self.lora.scale, self.dtype)
    return y.reshape(lead + (self.features,))


# --------------------------------------------------------------------------- pytree helpers
def _flat(params: Mapping) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(params))


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def path_str(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def target_kernel_paths(params: Mapping, lora: LoraConfig) -> list[tuple[str, ...]]:
  """Paths of the `kernel` leaves that `lora` adapts; error if a requested target matches none."""
  flat = _flat(params)
  found = [p for p in flat if p[-1] == "kernel" and len(p) >= 2 and p[-2] in lora.target_modules]
  for t in lora.targets:
    names = SHORTHANDS.get(t, (t,))
    if not any(p[-2] in names for p in found):
      raise ValueError(f"lora.targets: {t!r} matches no module in these params")
  return found


def add_lora(params: Mapping, lora: LoraConfig, rng: jax.Array, *legacy_rng: jax.Array) -> dict:
  """Returns params with `lora_a` / `lora_b` leaves added next to each targeted kernel.

  With `init="pissa"` the top-R singular directions of W move into A B and the kernel keeps the
  residual (the model output is unchanged up to float rounding). The older call
  `add_lora(params, model_config, lora, rng)`, whose model config was never used, still works
  and warns (`legacy_rng` is its rng).
  """
  if legacy_rng:
    if len(legacy_rng) != 1 or not isinstance(rng, LoraConfig):
      raise TypeError("add_lora(params, lora, rng) takes a LoraConfig and a PRNG key")
    warnings.warn("add_lora(params, config, lora, rng) is deprecated (the model config is unused):"
                  " call add_lora(params, lora, rng)", DeprecationWarning, stacklevel=2)
    lora, rng = rng, legacy_rng[0]
  flat = _flat(params)
  paths = target_kernel_paths(params, lora)
  keys = jax.random.split(rng, max(len(paths), 1))
  a_init = _a_init(lora)
  for key, path in zip(keys, paths):
    kernel = flat[path]
    d_in, d_out = kernel.shape
    if lora.rank > min(d_in, d_out):
      raise ValueError(f"lora.rank={lora.rank} exceeds min(in, out)={min(d_in, d_out)} of "
                       f"{path_str(path)}")
    mod = path[:-1]
    if lora.init == "pissa":
      u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
      root = jnp.sqrt(s[:lora.rank] / lora.scale)
      a = u[:, :lora.rank] * root
      b = root[:, None] * vt[:lora.rank]
      flat[path] = (kernel.astype(jnp.float32) - lora.scale * (a @ b)).astype(kernel.dtype)
    else:
      a = a_init(key, (d_in, lora.rank), jnp.float32)
      b = jnp.zeros((lora.rank, d_out), jnp.float32)
    flat[mod + ("lora_a",)] = a.astype(kernel.dtype)
    flat[mod + ("lora_b",)] = b.astype(kernel.dtype)
  return _unflat(flat)


def has_lora(params: Mapping) -> bool:
  return any(p[-1] in LORA_LEAVES for p in _flat(params))


def merge_lora(params: Mapping, lora: LoraConfig) -> dict:
  """W <- W + scale * A B for every adapted kernel; the LoRA leaves are removed."""
  flat = _flat(params)
  out = {p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES}
  for p, a in flat.items():
    if p[-1] != "lora_a":
      continue
    mod = p[:-1]
    kernel, b = flat[mod + ("kernel",)], flat[mod + ("lora_b",)]
    delta = lora.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    out[mod + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return _unflat(out)


def unmerge_lora(merged: Mapping, lora_params: Mapping, lora: LoraConfig) -> dict:
  """Inverse of `merge_lora`: W <- W - scale * A B and the LoRA leaves put back.

  `lora_params` is any tree holding the `lora_a` / `lora_b` leaves (e.g. the trainable subtree).
  """
  flat = _flat(merged)
  for p, leaf in _flat(lora_params).items():
    if p[-1] in LORA_LEAVES:
      flat[p] = leaf
  for p in list(flat):
    if p[-1] != "lora_a":
      continue
    mod = p[:-1]
    kernel = flat[mod + ("kernel",)]
    delta = lora.scale * (flat[p].astype(jnp.float32) @ flat[mod + ("lora_b",)].astype(jnp.float32))
    flat[mod + ("kernel",)] = (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)
  return _unflat(flat)


def trainable_labels(params: Mapping, lora: LoraConfig | None = None, *,
                     frozen_patterns: Iterable[str] = ()) -> dict:
  """Pytree of "trainable" / "frozen" strings with the structure of `params`.

  With a LoraConfig only LoRA leaves train. Without one (full finetuning) every leaf trains except
  those whose "/"-joined path matches a regex in `frozen_patterns` (e.g. "embed_tokens").
  """
  patterns = [re.compile(p) for p in frozen_patterns]
  flat = _flat(params)
  if lora is not None and not any(p[-1] in LORA_LEAVES for p in flat):
    raise ValueError("trainable_labels: a LoraConfig was given but params have no LoRA leaves; "
                     "call add_lora first")

  def label(path):
    if lora is not None:
      return TRAINABLE if path[-1] in LORA_LEAVES else FROZEN
    s = path_str(path)
    return FROZEN if any(p.search(s) for p in patterns) else TRAINABLE

  return _unflat({p: label(p) for p in flat})


def split_params(params: Mapping, labels: Mapping) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding disjoint leaves of `params`."""
  flat, flat_labels = _flat(params), _flat(labels)
  trainable = {p: v for p, v in flat.items() if flat_labels[p] == TRAINABLE}
  frozen = {p: v for p, v in flat.items() if flat_labels[p] != TRAINABLE}
  return _unflat(trainable), _unflat(frozen)


def combine_params(*trees: Mapping) -> dict:
  """Inverse of `split_params`: the union of disjoint nested dicts."""
  flat: dict = {}
  for tree in trees:
    for p, v in _flat(tree).items():
      if p in flat:
        raise ValueError(f"combine_params: leaf {path_str(p)} appears twice")
      flat[p] = v
  return _unflat(flat)


def optax_mask(tx: optax.GradientTransformation, labels: Mapping) -> optax.GradientTransformation:
  """`tx` on trainable leaves, zero updates (and no state) for frozen ones."""
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def lora_subtree(params: Mapping) -> dict:
  """Only the LoRA leaves of `params`."""
  return _unflat({p: v for p, v in _flat(params).items() if p[-1] in LORA_LEAVES})
