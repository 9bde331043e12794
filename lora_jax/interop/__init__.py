"""Reading and writing models: HF Llama dirs (hf.py), PEFT adapters (peft.py) and lora-jax
checkpoints (native.py, with `load_model` that opens any of the three)."""

from lora_jax.interop.hf import (hf_key_to_path, load_hf, open_hf_tensors, path_to_hf_key,
                                 save_hf)
from lora_jax.interop.native import (detect_format, load_checkpoint, load_model,
                                     read_checkpoint_info, save_checkpoint)
from lora_jax.interop.peft import load_peft, peft_key, peft_key_to_path, save_peft

__all__ = [
    "load_hf", "save_hf", "open_hf_tensors", "hf_key_to_path", "path_to_hf_key",
    "load_peft", "save_peft", "peft_key", "peft_key_to_path",
    "save_checkpoint", "load_checkpoint", "read_checkpoint_info", "load_model", "detect_format",
]
