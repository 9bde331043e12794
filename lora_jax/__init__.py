"""lora-jax: "LoRA Learns Less and Forgets Less" (Biderman et al., 2024) in JAX / Flax.

Public API (stable names):
  LlamaConfig, Llama, LoraConfig,
  load_hf, save_hf, load_peft, save_peft, load_model (HF dir | lora-jax checkpoint | PEFT adapter),
  add_lora, merge_lora, unmerge_lora, trainable_labels, split_params, combine_params.
"""

from lora_jax.config import LlamaConfig, preset
from lora_jax.lora import (LoraConfig, add_lora, combine_params, count_params, merge_lora,
                           split_params, trainable_labels, unmerge_lora)
from lora_jax.model import KVCache, Llama, init_kv_cache, init_params, param_logical_axes, param_shapes

__version__ = "0.1.0"


def __getattr__(name):  # interop is imported lazily (safetensors I/O is not needed to build models)
  if name in ("load_hf", "save_hf", "open_hf_tensors"):
    from lora_jax.interop import hf
    return getattr(hf, name)
  if name in ("load_peft", "save_peft"):
    from lora_jax.interop import peft
    return getattr(peft, name)
  if name in ("load_model", "save_checkpoint", "load_checkpoint"):
    from lora_jax.interop import native
    return getattr(native, name)
  raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


__all__ = [
    "LlamaConfig", "Llama", "LoraConfig", "load_hf", "save_hf", "load_peft", "save_peft",
    "add_lora", "merge_lora", "unmerge_lora", "trainable_labels", "split_params",
    "combine_params", "count_params", "init_params", "param_shapes", "param_logical_axes",
    "init_kv_cache", "KVCache", "preset", "open_hf_tensors", "load_model", "save_checkpoint",
    "load_checkpoint",
]
