#!/usr/bin/env python3
"""Download Llama-2-7B and the paper's datasets from the Hugging Face Hub into the layout the
configs/paper/* files expect, and optionally upload it to a GCS bucket for launch/tpu.py and
launch/gpu.py (--bucket). Gated repos (meta-llama/Llama-2-7b-hf, bigcode/starcoderdata) need
`hf auth login` with access granted. --dry-run prints the commands.

  python launch/prepare_data.py --out /data/lora-jax --regimes code_ift,math_ift \\
      --bucket gs://MY_BUCKET

Layout (under --out, mirrored to the bucket):
  models/Llama-2-7b-hf/                  config.json, *.safetensors, tokenizer.model
  data/magicoder-evol-instruct-110k/     *.jsonl  (instruction, response)
  data/metamathqa/                       *.jsonl  (query, response)
  data/starcoder-python/                 *.parquet (content)
  data/open-web-math/                    *.parquet (text)
The evaluation sets (HumanEval, GSM8K, HellaSwag, ARC, WinoGrande) are fetched by `lora-jax
eval`'s own instructions, not here.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud  # noqa: E402

MODEL = ("meta-llama/Llama-2-7b-hf", "models/Llama-2-7b-hf",
         ["config.json", "generation_config.json", "*.safetensors",
          "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
          "tokenizer_config.json"])
# regime -> (HF dataset, files to fetch, sub-directory to flatten, JSON array to convert)
DATASETS = {
    "code_cpt": ("bigcode/starcoderdata", "data/starcoder-python", ["python/*.parquet"],
                 "python", None),
    "math_cpt": ("open-web-math/open-web-math", "data/open-web-math", ["data/*.parquet"],
                 "data", None),
    "code_ift": ("ise-uiuc/Magicoder-Evol-Instruct-110K", "data/magicoder-evol-instruct-110k",
                 ["*.jsonl"], None, None),
    "math_ift": ("meta-math/MetaMathQA", "data/metamathqa", ["MetaMathQA-395K.json"], None,
                 "MetaMathQA-395K.json"),
}
JSON_TO_JSONL = ("import json, sys; rows = json.load(open(sys.argv[1])); "
                 "out = open(sys.argv[2], 'w'); "
                 "[out.write(json.dumps(r) + chr(10)) for r in rows]")


def download(repo: str, dest: str, include: list[str], repo_type: str = "model") -> list[str]:
  return ["hf", "download", repo, "--repo-type", repo_type, "--local-dir", dest,
          "--include", *include]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="launch/prepare_data.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="local root of models/ and data/")
  parser.add_argument("--regimes", default=",".join(DATASETS),
                      help=f"comma-separated, from {list(DATASETS)}")
  parser.add_argument("--no-model", action="store_true", help="skip Llama-2-7b-hf")
  parser.add_argument("--bucket", default="", help="gs://BUCKET to upload models/ and data/ to")
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args(argv)
  regimes = [r for r in args.regimes.split(",") if r]
  for r in regimes:
    if r not in DATASETS:
      parser.error(f"--regimes: unknown regime {r!r}; choose from {list(DATASETS)}")
  sh = cloud.Shell(dry_run=args.dry_run)
  out = args.out.rstrip("/")
  if not args.no_model:
    repo, sub, include = MODEL
    sh.run(download(repo, f"{out}/{sub}", include))
  for r in regimes:
    repo, sub, include, flatten, convert = DATASETS[r]
    dest = f"{out}/{sub}"
    sh.run(download(repo, dest, include, repo_type="dataset"))
    if flatten:  # hub sub-directory -> the dataset directory itself
      sh.run(["bash", "-c", f"mv {dest}/{flatten}/* {dest}/ && rmdir {dest}/{flatten}"])
    if convert:  # a JSON array -> JSON lines
      src = f"{dest}/{convert}"
      sh.run([sys.executable, "-c", JSON_TO_JSONL, src, src.replace(".json", ".jsonl")])
      sh.run(["rm", src])
  if args.bucket:
    bucket = args.bucket.rstrip("/")
    for part in (["models"] if not args.no_model else []) + ["data"]:
      sh.run(["gcloud", "storage", "rsync", "--recursive", f"{out}/{part}", f"{bucket}/{part}"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
