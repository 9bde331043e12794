"""Evaluation during training: the eval function a run's `eval.*` keys describe, and the metric
that picks the best checkpoint.

An eval function is `eval_fn(step, params) -> {task: {metric: value}}`; train() runs it every
train.eval_every steps (and at the last step). Without one passed in, train() builds it from
eval.tasks / eval.data_dir / eval.limit with lora_jax.evals, which writes each evaluation's
results under output_dir/eval/step_<N>/.
"""

from __future__ import annotations

import logging
from typing import Callable

from lora_jax import config as rc
from lora_jax import fileio
from lora_jax.training.setup import open_tokenizer

EvalFn = Callable[[int, dict], dict]


def eval_fn_from_config(cfg) -> EvalFn | None:
  """eval_fn running eval.tasks with lora_jax.evals; None without tasks or train.eval_every.
  Unknown tasks and missing eval files fail here (a ConfigError naming eval.tasks), not after
  hours of training."""
  if not cfg.eval.tasks or not cfg.train.eval_every:
    return None
  from lora_jax.evals.runner import EvalOptions, check_data, expand_tasks, run_evals
  try:
    tasks = expand_tasks(cfg.eval.tasks)
    options = EvalOptions(data_dir=cfg.eval.data_dir or None, limit=cfg.eval.limit or None,
                          progress=False)
    check_data(tasks, options)
  except (ValueError, FileNotFoundError) as e:
    raise rc.ConfigError("eval.tasks", str(e)) from None
  model_config, lora = rc.model_config_from(cfg), rc.lora_config(cfg)
  tokenizer = open_tokenizer(cfg)
  log = logging.getLogger("lora_jax.eval").info

  def eval_fn(step, params):
    results = run_evals(model_config, params, lora, tokenizer, tasks, options,
                        out_dir=fileio.join(cfg.output_dir, "eval", f"step_{step}"), step=step,
                        log=log)
    out: dict = {}
    for e in results["results"]:
      out.setdefault(e["task"], {})[e["metric"]] = e["value"]
    return out

  return eval_fn


def flatten_eval(result: dict) -> dict[str, float]:
  """{"task/metric": value} of an eval_fn result (a bare {task: value} keeps its task name)."""
  out = {}
  for task, ms in result.items():
    if isinstance(ms, dict):
      out.update({f"{task}/{m}": v for m, v in ms.items() if isinstance(v, (int, float))})
    elif isinstance(ms, (int, float)):
      out[task] = ms
  return out


def best_metric_key(cfg, flat: dict) -> str | None:
  """The key of `flat` that eval.best_metric names ("auto": the first loss), None if absent."""
  want = cfg.eval.best_metric
  if want == "auto":
    return next((k for k in flat if k == "loss" or k.endswith("/loss")), None)
  return want if want in flat else None
