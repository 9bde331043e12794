"""The model's backend fork: which kernels run on which platform, in one place.

`lora_jax.model` is written once as the math; the two computations whose best form depends on
the hardware go through here:

  project(x, denses, deterministic, platform)   projections that read the same x
  attention(q, k, v, mask, ..., platform)        softmax attention

  platform  projections                                  attention
  "cpu"     adapted groups: `grouped_lora_dense`          `einsum_attention` (causal query blocks)
            (cpu_lora_group.py), else one LoraDense each  (cpu_attention.py)
  "tpu"     one LoraDense each, under autodiff             splash (tpu_attention.py), else XLA's
  "gpu"     one LoraDense each, under autodiff             cuDNN flash attention, else XLA's

The platform is the one of the devices a program is compiled for (`platform_of(mesh)`), never
the host process's default backend: a TPU program compiled ahead of time on a CPU host must get
the TPU code. The run config's `model.platform` ("auto" = the mesh's) overrides it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.ops.cpu_attention import einsum_attention
from lora_jax.ops import tpu_attention
from lora_jax.ops.cpu_lora_group import grouped_lora_dense

Array = jax.Array
PLATFORMS = ("cpu", "gpu", "tpu")


def platform_of(mesh_or_devices: Any) -> str:
  """"cpu" | "gpu" | "tpu": the platform of a Mesh's devices or of a sequence of devices
  (abstract TPU topology devices from `jax.experimental.topologies` included)."""
  devices = getattr(mesh_or_devices, "devices", mesh_or_devices)
  if isinstance(devices, np.ndarray):
    devices = devices.flat
  elif not isinstance(devices, (Sequence, np.ndarray)) and hasattr(devices, "platform"):
    devices = [devices]  # one device
  platforms = {d.platform for d in devices}
  if len(platforms) != 1:
    raise ValueError(f"platform_of: expected devices of one platform, got {sorted(platforms)}")
  platform = platforms.pop()
  if platform not in PLATFORMS:
    raise ValueError(f"platform_of: unsupported device platform {platform!r}; lora-jax runs on "
                     f"{PLATFORMS}")
  return platform


def resolve_platform(setting: str | None, mesh_or_devices: Any = None) -> str:
  """The platform a program runs its code paths for: `setting` ("cpu", "gpu", "tpu"), or with
  "auto" / None the platform of `mesh_or_devices` (default: jax's devices)."""
  if setting in (None, "auto"):
    return platform_of(jax.devices() if mesh_or_devices is None else mesh_or_devices)
  if setting not in PLATFORMS:
    raise ValueError(f"model.platform must be 'auto' or one of {PLATFORMS}, got {setting!r}")
  return setting


def project(x_BLD: Array, denses: list, deterministic: bool, platform: str) -> list[Array]:
  """The outputs of `LoraDense` modules `denses` applied to the same x.

  On CPU a group with an adapter (and no active LoRA dropout) runs as one `grouped_lora_dense`
  (merged adapters, hand-written VJP); otherwise each LoraDense runs on its own under autodiff.
  """
  lora = denses[0].lora
  grouped = platform == "cpu" and any(d.adapted for d in denses) and (
      lora.dropout == 0 or deterministic)
  if not grouped:
    return [d(x_BLD, deterministic) for d in denses]
  dtype = denses[0].dtype
  params = [d(x_BLD, params_only=True) for d in denses]
  cast = lambda w: None if w is None else w.astype(dtype)  # noqa: E731
  B, L, D = x_BLD.shape
  ys = grouped_lora_dense(x_BLD.reshape(B * L, D).astype(dtype),
                          [cast(k) for k, _, _ in params], [cast(a) for _, a, _ in params],
                          [cast(b) for _, _, b in params], lora.scale)
  return [y.reshape(B, L, -1) for y in ys]


IMPLS = ("xla", "cudnn", "splash")  # LlamaConfig.attention_impl; None picks per platform


def _cudnn_applies(q_BLHD: Array) -> bool:
  """cuDNN flash attention's constraints: 16-bit inputs, head dim a multiple of 8, <= 128."""
  Dh = q_BLHD.shape[-1]
  return q_BLHD.dtype in (jnp.bfloat16, jnp.float16) and Dh % 8 == 0 and Dh <= 128


def attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, mask_B1LS: Array, *,
              segment_ids_BL: Array | None = None, platform: str, impl: str | None = None,
              mesh: Any = None) -> Array:
  """Softmax attention [B, L, H, Dh] (GQA: H a multiple of K) under a boolean mask.

  `segment_ids_BL` is given for causal self-attention (no KV cache: query slot i is key slot i
  and `mask_B1LS` = causal & same non-zero segment); only then can the CPU path skip the keys
  after each query block and TPU use splash. `impl` (LlamaConfig.attention_impl): None picks per
  platform (CPU: einsum_attention; TPU: splash where it applies; GPU: cuDNN where its constraints
  hold; else XLA's); "xla" and "cudnn" force jax.nn.dot_product_attention's implementation;
  "splash" uses the kernel where it applies. `mesh`: the mesh the program is compiled for, over
  which a kernel XLA cannot partition runs per shard.
  """
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"attention_impl must be None or one of {IMPLS}, got {impl!r}")
  causal = segment_ids_BL is not None
  if impl is None:
    if platform == "cpu":
      return einsum_attention(q_BLHD, k_BSKD, v_BSKD, mask_B1LS, causal_chunks=causal)
    # The kernels compile for their own devices only: an accelerator path forced onto a mesh of
    # other devices (model.platform=tpu on a CPU host, the accelerator path's tests) uses XLA's.
    devices = platform if mesh is None else platform_of(mesh)
    impl = "xla"
    if platform == devices == "tpu":
      impl = "splash"
    elif platform == devices == "gpu" and causal and _cudnn_applies(q_BLHD):
      impl = "cudnn"
  if impl == "splash":
    if causal and tpu_attention.supported(q_BLHD.shape[1]):
      return tpu_attention.splash_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, mesh=mesh)
    impl = "xla"
  # cuDNN skips the blocks above the diagonal with is_causal; the mask (as a bias) adds segments.
  return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_B1LS,
                                      scale=1.0 / math.sqrt(q_BLHD.shape[-1]),
                                      is_causal=causal and impl == "cudnn", implementation=impl)


__all__ = ["IMPLS", "PLATFORMS", "attention", "einsum_attention", "grouped_lora_dense",
           "platform_of", "project", "resolve_platform"]
