"""Task registry and `run_evals`, the in-process entry of `lora-jax eval`, training and the demo.

    results = run_evals(config, params, lora_config, tokenizer,
                        ["gsm8k", "forgetting"], EvalOptions(data_dir="data/evals"),
                        out_dir="runs/x/eval", model="runs/x/ckpt")

returns the results dict of `lora_jax.evals.results` (and writes `results.json` plus
`samples_<task>.jsonl` when `out_dir` is given). `forgetting` runs hellaswag, arc_challenge and
winogrande and adds their mean. All data files are checked before any model work starts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from lora_jax.evals import gsm8k as gsm8k_lib
from lora_jax.evals import multiple_choice as mc
from lora_jax.evals import results as res
from lora_jax.evals import task_data

GENERATION_TASKS = ("humaneval", "gsm8k")
DERIVED_TASKS = {"forgetting": res.FORGETTING_TASKS}
ALL_TASKS = GENERATION_TASKS + mc.TASKS + tuple(DERIVED_TASKS)
DEFAULT_FEWSHOT = {"gsm8k": gsm8k_lib.DEFAULT_FEWSHOT, **mc.DEFAULT_FEWSHOT}
HEADLINES = {"humaneval": "pass@1", "gsm8k": "strict_match", **mc.DEFAULT_HEADLINE,
             "forgetting": "acc"}


@dataclasses.dataclass
class EvalOptions:
  data_dir: str | None = None
  limit: int | None = None                 # first N examples (problems) of every task
  num_fewshot: dict[str, int] = dataclasses.field(default_factory=dict)  # overrides
  batch_size: int = 8
  fewshot_seed: int = 1234                  # lm-eval's default few-shot seed
  add_bos: bool | None = None               # None: the tokenizer's own setting (add_bos_token)
  mc_headline: str | None = None            # acc / acc_norm / acc_per_token for every MC task
  merge_lora: bool = False                  # fold LoRA into the kernels before evaluating
  gsm8k_max_new_tokens: int = 256           # lm-eval's max_gen_toks
  humaneval_samples: int = 50               # paper: n=50, T=0.2, top-p 0.95
  humaneval_temperature: float = 0.2
  humaneval_top_p: float = 0.95
  humaneval_max_new_tokens: int = 512
  humaneval_workers: int = 2
  humaneval_seed: int = 0
  humaneval_ks: tuple[int, ...] | None = None  # pass@k reported (None: 1, 10, 100)
  progress: bool = True


def expand_tasks(tasks: Sequence[str] | str) -> list[str]:
  """Task names validated and de-duplicated; derived tasks pull in their components."""
  if isinstance(tasks, str):
    tasks = [t for t in tasks.replace(" ", "").split(",") if t]
  if not tasks:
    raise ValueError(f"no tasks given; choose from {list(ALL_TASKS)}")
  unknown = [t for t in tasks if t not in ALL_TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; choose from {list(ALL_TASKS)}")
  out: list[str] = []
  for t in tasks:
    for x in (*DERIVED_TASKS.get(t, ()), t):
      if x not in out:
        out.append(x)
  # Derived tasks last, after their components.
  return [t for t in out if t not in DERIVED_TASKS] + [t for t in out if t in DERIVED_TASKS]


def num_fewshot(task: str, options: EvalOptions) -> int:
  return int(options.num_fewshot.get(task, DEFAULT_FEWSHOT.get(task, 0)))


def check_data(tasks: Sequence[str],
               options: EvalOptions) -> dict[str, tuple[str | None, str | None]]:
  """{task: (eval file, few-shot file or None)}; one FileNotFoundError lists every missing file."""
  found, missing = {}, []
  for t in tasks:
    if t in DERIVED_TASKS:
      continue
    if t == "humaneval":
      found[t] = (task_data.find_file(options.data_dir, task_data.DATA_FILES[t][0]), None)
      if found[t][0] is None:
        try:
          from lora_jax.evals import humaneval
          humaneval.default_problems_path()
        except (ImportError, FileNotFoundError) as e:
          missing.append(task_data.missing_message(options.data_dir, t,
                                                   task_data.DATA_FILES[t][0]) + f" ({e})")
      continue
    path = task_data.find_file(options.data_dir, task_data.DATA_FILES[t][0])
    if path is None:
      missing.append(task_data.missing_message(options.data_dir, t, task_data.DATA_FILES[t][0]))
      continue
    shots = task_data.fewshot_file(options.data_dir, t) if num_fewshot(t, options) else None
    found[t] = (path, shots)
  if missing:
    raise FileNotFoundError("missing eval data:\n  " + "\n  ".join(missing))
  return found


class _Models:
  """Builds the Scorer and the generate_fn once, on first use."""

  def __init__(self, config, params, lora_config, tokenizer, options: EvalOptions, mesh):
    from lora_jax.evals.scoring import resolve_add_bos
    self.args = (config, params, lora_config, tokenizer)
    self.options, self.mesh = options, mesh
    self.add_bos = resolve_add_bos(tokenizer, options.add_bos)
    self._scorer = self._generate = None

  @property
  def scorer(self):
    if self._scorer is None:
      from lora_jax.evals.scoring import Scorer
      config, params, lora, tok = self.args
      if self.options.merge_lora and lora is not None:
        from lora_jax.lora import merge_lora
        params, lora = merge_lora(params, lora), None
      self._scorer = Scorer(config, params, lora, tok, batch_size=self.options.batch_size,
                            add_bos=self.add_bos, mesh=self.mesh)
    return self._scorer

  @property
  def generate_fn(self):
    if self._generate is None:
      from lora_jax.generate import make_generate_fn
      self._generate = make_generate_fn(*self.args, batch_size=self.options.batch_size,
                                        mesh=self.mesh, merge=self.options.merge_lora,
                                        add_bos=self.add_bos,
                                        progress=self.options.progress)
    return self._generate


def _bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="req", leave=False)


def run_evals(config: Any, params: Any, lora_config: Any, tokenizer: Any,
              tasks: Sequence[str] | str, options: EvalOptions | None = None, *,
              out_dir: str | None = None, model: str = "", adapter: str | None = None,
              step: int | None = None, tokens: int | None = None, mesh: Any = None,
              log: Callable[[str], None] | None = print) -> dict:
  """Runs `tasks` on one model and returns (and with `out_dir` writes) the results dict."""
  options = options or EvalOptions()
  tasks = expand_tasks(tasks)
  files = check_data(tasks, options)
  models = _Models(config, params, lora_config, tokenizer, options, mesh)
  entries: list[dict] = []
  log = log or (lambda s: None)
  for task in tasks:
    t0 = time.time()
    if task in DERIVED_TASKS:
      new = [res.forgetting_entry(entries)]
    elif task == "humaneval":
      new = _run_humaneval(models, files[task][0], options, out_dir)
    elif task == "gsm8k":
      new, rows = _run_gsm8k(models, files[task], options)
      if out_dir:
        res.write_samples(out_dir, task, rows)
    else:
      new, rows = _run_mc(task, models, files[task], options)
      if out_dir:
        res.write_samples(out_dir, task, rows)
    seconds = round(time.time() - t0, 2)
    for e in new:
      e["settings"].setdefault("seconds", seconds)
    entries.extend(new)
    head = res.headline_entry(new, task)
    if head is not None:
      log(f"{task}: {head['metric']} = {head['value']:.4f} ± {head['stderr']:.4f} "
          f"(n={head['n']}, {seconds:.1f}s)")
  results = res.build_results(entries, model=model, adapter=adapter, step=step, tokens=tokens)
  results["bos"] = {"add_bos": models.add_bos,
                    "source": "tokenizer" if options.add_bos is None else "--bos/--no-bos",
                    "tokenizer_add_bos": getattr(tokenizer, "add_bos", None)}
  if out_dir:
    res.write_results(out_dir, results)
  return results


def _run_gsm8k(models: _Models, files, options: EvalOptions):
  path, shots_path = files
  problems = gsm8k_lib.parse_problems(task_data.read_rows(path))
  pool = gsm8k_lib.parse_problems(task_data.read_rows(shots_path)) if shots_path else None
  return gsm8k_lib.evaluate_gsm8k(
      models.generate_fn, problems, pool, num_fewshot=num_fewshot("gsm8k", options),
      seed=options.fewshot_seed, max_new_tokens=options.gsm8k_max_new_tokens,
      limit=options.limit, source=path)


def _run_mc(task: str, models: _Models, files, options: EvalOptions):
  path, shots_path = files
  docs = mc.parse_docs(task, task_data.read_rows(path))
  pool = mc.parse_docs(task, task_data.read_rows(shots_path)) if shots_path else None
  n_docs = len(docs) if options.limit is None else min(options.limit, len(docs))
  bar = _bar(sum(len(d.contexts) for d in docs[:n_docs]), task, options.progress)
  try:
    return mc.evaluate_multiple_choice(
        task, models.scorer, docs, pool, num_fewshot=num_fewshot(task, options),
        seed=options.fewshot_seed, limit=options.limit, headline=options.mc_headline,
        progress=bar, source=path)
  finally:
    if bar is not None:
      bar.close()


def _run_humaneval(models: _Models, path: str | None, options: EvalOptions,
                   out_dir: str | None) -> list[dict]:
  from lora_jax.evals import humaneval
  entries = humaneval.evaluate_humaneval(
      models.generate_fn, problems_path=path, n_samples=options.humaneval_samples,
      temperature=options.humaneval_temperature, top_p=options.humaneval_top_p,
      max_new_tokens=options.humaneval_max_new_tokens, limit=options.limit, out_dir=out_dir,
      workers=options.humaneval_workers, seed=options.humaneval_seed,
      **({"ks": options.humaneval_ks} if options.humaneval_ks else {}))
  out = []
  for e in entries:
    e = dict(e)
    e["settings"] = {**e.get("settings", {}), "headline_metric": HEADLINES["humaneval"]}
    out.append(e)
  return out
