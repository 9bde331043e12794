"""`lora-jax eval`: HumanEval, GSM8K and the forgetting tasks on an HF dir, lora-jax checkpoint or
PEFT adapter; writes results.json (see lora_jax.evals.results) and samples_<task>.jsonl."""

from __future__ import annotations

import argparse
import os
import sys

from lora_jax import fileio
from lora_jax.commands import argtypes

HELP = ("Evaluate a model (HF dir, lora-jax checkpoint, or base + PEFT adapter) on humaneval, "
        "gsm8k, hellaswag, arc_challenge, arc_easy, winogrande, piqa and forgetting.")

_DTYPES = ("float32", "bfloat16", "float16")
# What `eval` writes into --out (an --out holding other files needs --overwrite).
OWNED_FILES = ("results.json", "samples_*.jsonl", "humaneval_results.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
  from lora_jax.evals.runner import ALL_TASKS
  p.add_argument("--model", required=True,
                 help="HF Llama directory, lora-jax checkpoint, or PEFT adapter dir (its base "
                      "from adapter_config.json)")
  p.add_argument("--adapter", default=None, help="PEFT adapter directory applied to --model")
  p.add_argument("--tasks", default="humaneval,gsm8k,forgetting",
                 help=f"comma-separated, from {','.join(ALL_TASKS)} "
                      "(forgetting = hellaswag + arc_challenge + winogrande and their mean)")
  p.add_argument("--data-dir", default=None, type=argtypes.existing_dir,
                 help="eval data root; expected files are listed in lora_jax/evals/task_data.py "
                      "(e.g. gsm8k/test.jsonl, hellaswag/validation.jsonl)")
  p.add_argument("--out", required=True, type=argtypes.output_dir,
                 help="output directory for results.json and samples")
  argtypes.add_overwrite_flag(p)
  p.add_argument("--limit", type=argtypes.positive_int, default=None,
                 help="first N examples of every task")
  p.add_argument("--tokenizer", default=None,
                 help="'byte', a tokenizer.json / .model, or a dir (default: the model dir)")
  p.add_argument("--batch-size", type=argtypes.positive_int, default=8, help="sequences per forward pass")
  p.add_argument("--num-fewshot", default="",
                 help="per-task shots, e.g. 'arc_challenge=25,winogrande=0' (defaults: gsm8k 5, "
                      "hellaswag 0, arc 3, winogrande 5, piqa 0)")
  p.add_argument("--fewshot-seed", type=int, default=1234)
  p.add_argument("--mc-metric", choices=("acc", "acc_norm", "acc_per_token"), default=None,
                 help="headline metric of every multiple-choice task (default: acc_norm for "
                      "hellaswag/arc/piqa, acc for winogrande); all three are always reported")
  p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                 help="prepend the BOS token to every request (default: as the tokenizer does, "
                      "its add_bos_token / post-processor; lm-eval adds none to log-likelihood "
                      "requests, so --no-bos matches its default); recorded in results.json")
  p.add_argument("--merge-lora", action="store_true",
                 help="fold LoRA into the kernels first (default: apply it unmerged)")
  p.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="cast params and compute in this dtype (default: params as stored, float32 "
                      "compute)")
  p.add_argument("--gsm8k-max-new-tokens", type=argtypes.positive_int, default=256)
  p.add_argument("--passk-curve", action="store_true",
                 help="HumanEval pass@k for every k = 1..n, from n = 256 samples at T = 0.8 "
                      "unless given (the paper's Appendix F / Fig. S9)")
  p.add_argument("--humaneval-samples", type=argtypes.positive_int, default=None,
                 help="n per problem (paper: 50)")
  p.add_argument("--humaneval-temperature", type=argtypes.non_negative_float, default=None,
                 help="default 0.2 (0.8 with --passk-curve)")
  p.add_argument("--humaneval-top-p", type=argtypes.probability, default=0.95)
  p.add_argument("--max-new-tokens", type=argtypes.positive_int, default=512,
                 help="HumanEval completion budget")
  p.add_argument("--workers", type=argtypes.positive_int, default=2,
                 help="HumanEval sandbox processes")
  p.add_argument("--step", type=int, default=None, help="training step recorded in results.json")
  p.add_argument("--tokens", type=int, default=None,
                 help="training tokens recorded in results.json")
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_fewshot(spec: str) -> dict[str, int]:
  """'arc_challenge=25,winogrande=0' -> {task: shots}; an unknown task name is an error."""
  from lora_jax.evals.runner import DEFAULT_FEWSHOT
  out = {}
  for part in (s.strip() for s in spec.split(",")):
    if not part:
      continue
    task, sep, k = part.partition("=")
    if not sep or not k.strip().isdigit():
      raise ValueError(f"--num-fewshot: expected task=k, got {part!r}")
    if task.strip() not in DEFAULT_FEWSHOT:
      raise ValueError(f"--num-fewshot: unknown task {task.strip()!r}; tasks with shots: "
                       f"{', '.join(sorted(DEFAULT_FEWSHOT))}")
    out[task.strip()] = int(k)
  return out


def _load_model(args):
  try:
    from lora_jax.interop.native import load_model
  except ImportError as e:  # pragma: no cover - interop ships with the package
    raise RuntimeError(f"lora_jax.interop.native is unavailable ({e})") from e
  config, params, lora = load_model(args.model, adapter=args.adapter, dtype=args.dtype)
  if args.dtype:
    config = config.replace(dtype=args.dtype)
  return config, params, lora


def _tokenizer(args):
  from lora_jax.data.tokenizers import load_tokenizer
  if args.tokenizer:
    return load_tokenizer(args.tokenizer)
  candidates = [args.model]
  meta = _checkpoint_metadata(args.model)
  if meta.get("base_model_name_or_path"):
    candidates.append(meta["base_model_name_or_path"])
  for c in candidates:
    c = str(c) if fileio.is_remote(str(c)) else os.path.expanduser(str(c))
    if fileio.isdir(c) and any(fileio.exists(fileio.join(c, f))
                               for f in ("tokenizer.json", "tokenizer.model")):
      return load_tokenizer(c)
  raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {' or '.join(candidates)}; "
                          "pass --tokenizer (a file, a dir, or 'byte')")


def _checkpoint_metadata(path: str) -> dict:
  try:
    from lora_jax.interop.native import META_FILE, read_checkpoint_info
  except ImportError:  # pragma: no cover
    return {}
  if not fileio.isfile(fileio.join(path, META_FILE)):
    return {}
  return dict(read_checkpoint_info(path).get("metadata") or {})


def _humaneval_sampling(args) -> dict:
  """n, temperature and ks: the paper's pass@1 setting (n = 50, T = 0.2), or its pass@k curve."""
  from lora_jax.evals import passk
  if args.passk_curve:
    n = args.humaneval_samples or passk.CURVE_SAMPLES
    temperature = args.humaneval_temperature
    return {"humaneval_samples": n, "humaneval_ks": passk.curve_ks(n),
            "humaneval_temperature": passk.CURVE_TEMPERATURE if temperature is None
            else temperature}
  return {"humaneval_samples": args.humaneval_samples or 50,
          "humaneval_temperature": 0.2 if args.humaneval_temperature is None
          else args.humaneval_temperature}


def run(args: argparse.Namespace) -> int:
  from lora_jax.data.errors import DataError
  from lora_jax.evals import results as res
  from lora_jax.evals.runner import EvalOptions, expand_tasks, run_evals

  try:
    argtypes.claim_output_dir(args.out, OWNED_FILES, args.overwrite)
    tasks = expand_tasks(args.tasks)
    options = EvalOptions(
        data_dir=args.data_dir, limit=args.limit, num_fewshot=parse_fewshot(args.num_fewshot),
        batch_size=args.batch_size, fewshot_seed=args.fewshot_seed, add_bos=args.bos,
        mc_headline=args.mc_metric, merge_lora=args.merge_lora,
        gsm8k_max_new_tokens=args.gsm8k_max_new_tokens,
        **_humaneval_sampling(args), humaneval_top_p=args.humaneval_top_p,
        humaneval_max_new_tokens=args.max_new_tokens, humaneval_workers=args.workers,
        progress=not args.quiet)
    from lora_jax.evals.runner import check_data
    check_data(tasks, options)  # fail before loading a large model
    tokenizer = _tokenizer(args)
    config, params, lora = _load_model(args)
    from lora_jax.data.tokenizers import check_vocab
    check_vocab(tokenizer, config.vocab_size, where="--tokenizer")
    meta = _checkpoint_metadata(args.model)
    step = args.step if args.step is not None else meta.get("step")
    tokens = args.tokens if args.tokens is not None else meta.get("tokens")
    results = run_evals(config, params, lora, tokenizer, tasks, options, out_dir=args.out,
                        model=args.model, adapter=args.adapter, step=step, tokens=tokens)
  except (OSError, DataError, ValueError, RuntimeError) as e:
    print(f"lora-jax eval: {e}", file=sys.stderr)
    return 2
  print(res.format_table(results))
  print(f"wrote {fileio.join(args.out, res.RESULTS_FILE)}")
  return 0
