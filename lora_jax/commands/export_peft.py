"""`lora-jax export-peft`: a lora-jax LoRA checkpoint -> PEFT adapter dir (and a merged HF dir)."""

from __future__ import annotations

import argparse
import sys

HELP = ("Export a lora-jax LoRA checkpoint as a PEFT adapter (adapter_config.json + "
        "adapter_model.safetensors), optionally also the merged model as an HF dir.")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("checkpoint", metavar="CHECKPOINT", help="lora-jax checkpoint dir with LoRA")
  p.add_argument("out", metavar="OUT",
                 help="PEFT adapter output dir: new, empty, or an earlier adapter export")
  p.add_argument("--overwrite", action="store_true",
                 help="write into directories that hold other files: replace lora-jax's own "
                      "files and keep the rest")
  p.add_argument("--base-model-name", default=None, metavar="NAME",
                 help="base_model_name_or_path to record (default: from the checkpoint)")
  p.add_argument("--merged-hf", default=None, metavar="DIR",
                 help="also write the merged model (W + scale A B) as an HF dir")


def run(args: argparse.Namespace) -> int:
  from lora_jax.interop import hf, native, peft
  try:
    if native.detect_format(args.checkpoint) != "lora-jax":
      raise ValueError(f"{args.checkpoint}: not a lora-jax checkpoint (no {native.META_FILE}); "
                       "convert it first with `lora-jax convert`")
    info = native.read_checkpoint_info(args.checkpoint)
    config, params, lora = native.load_checkpoint(args.checkpoint)
    if lora is None:
      raise ValueError(f"{args.checkpoint}: checkpoint has no LoRA adapters; export the full "
                       "model with `lora-jax convert CHECKPOINT OUT --to hf`")
    base = args.base_model_name
    if base is None:
      base = info.get("metadata", {}).get("base_model_name_or_path", "")
    out = peft.save_peft(args.out, config, lora, params, base_model_name_or_path=base,
                         overwrite=args.overwrite)
    print(f"wrote PEFT adapter {out} (r={lora.rank}, alpha={lora.lora_alpha:g}, "
          f"targets={','.join(lora.target_modules)}, base={base or '(unset)'})")
    if args.merged_hf:
      merged = hf.save_hf(args.merged_hf, config, params, lora_config=lora,
                           overwrite=args.overwrite)
      print(f"wrote merged HF model {merged}")
  except (ValueError, OSError) as e:
    print(f"lora-jax export-peft: error: {e}", file=sys.stderr)
    return 2
  return 0
