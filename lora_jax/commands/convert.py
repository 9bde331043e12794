"""`lora-jax convert`: HF dir <-> lora-jax checkpoint (a LoRA checkpoint becomes a merged HF dir)."""

from __future__ import annotations

import argparse
import re
import sys

from lora_jax import fileio

HELP = ("Convert between an HF Llama dir and a lora-jax checkpoint (direction from SRC); a LoRA "
        "checkpoint or PEFT adapter is merged when writing HF.")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
  """"5GB", "500MiB" or a plain byte count -> bytes."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
    raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MiB, 1000000)")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", metavar="SRC",
                 help="HF dir (config.json + safetensors), lora-jax checkpoint, or PEFT adapter dir")
  p.add_argument("dst", metavar="DST",
                 help="output directory: new, empty, or an earlier output of the same format")
  p.add_argument("--overwrite", action="store_true",
                 help="write into a DST that holds other files: replace lora-jax's own files "
                      "(config.json, weights) and keep the rest (tokenizer, README, ...)")
  p.add_argument("--to", choices=["hf", "lora-jax"], default=None,
                 help="output format (default: hf for a lora-jax checkpoint, else lora-jax)")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="cast params (default: keep the source dtypes)")
  p.add_argument("--adapter", default=None, metavar="DIR",
                 help="PEFT adapter dir to apply on SRC (the base)")
  p.add_argument("--max-shard-size", type=parse_size, default="5GiB",
                 help="HF output: shard safetensors above this size (default 5GiB)")


def run(args: argparse.Namespace) -> int:
  from lora_jax.interop import hf, native
  try:
    kind = native.detect_format(args.src)
    to = args.to or ("hf" if kind == "lora-jax" and args.adapter is None else "lora-jax")
    config, params, lora = native.load_model(args.src, adapter=args.adapter, dtype=args.dtype)
    if to == "hf":
      out = hf.save_hf(args.dst, config, params, max_shard_bytes=args.max_shard_size,
                       lora_config=lora, overwrite=args.overwrite)
      note = " (LoRA merged into the kernels)" if lora is not None else ""
    else:
      meta = {"source": fileio.abspath(args.src), "source_format": kind}
      base = _base_name(args, kind, native)
      if base:
        meta["base_model_name_or_path"] = base
      out = native.save_checkpoint(args.dst, config, params, lora, metadata=meta,
                                   overwrite=args.overwrite)
      note = f" (LoRA r={lora.rank}, kept as adapters)" if lora is not None else ""
  except (ValueError, OSError) as e:
    print(f"lora-jax convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {to} {out}{note}")
  return 0


def _base_name(args, kind, native) -> str:
  """What a later PEFT export should name as the base model."""
  from lora_jax.interop import peft
  from lora_jax.fileio import read_json
  if kind == "hf":
    return fileio.abspath(args.src)
  if kind == "lora-jax":
    return native.read_checkpoint_info(args.src).get("metadata", {}).get(
        "base_model_name_or_path", "")
  # A PEFT adapter: its own base name.
  ac = read_json(fileio.join(args.src, peft.ADAPTER_CONFIG), "PEFT adapter config")
  return ac.get("base_model_name_or_path") or ""
