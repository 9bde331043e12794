"""Learning and forgetting of one set of params, through the project's eval code.

  target acc   greedy decoding (`generate.make_generate_fn`, KV cache, stops at EOS), exact match
               on held-out target prompts: the demo's GSM8K / HumanEval.
  source acc   4-way multiple choice by summed log-likelihood (`evals.multiple_choice` over
               `evals.scoring.Scorer`), zero-shot, on held-out source questions: the demo's
               HellaSwag / ARC / WinoGrande. All choices of a question have the same length, so
               acc and acc_norm coincide.

LoRA params are merged before evaluating, so every run shares one compiled scorer and one
compiled generator (the model shape never changes).
"""

from __future__ import annotations

from typing import Any, Sequence

from lora_jax.config import LlamaConfig
from lora_jax.demo.domains import ChoiceItem, Example, exact_match_accuracy
from lora_jax.evals.diversity import GROUPS, unique_counts
from lora_jax.evals.multiple_choice import MCDoc, evaluate_multiple_choice
from lora_jax.evals.scoring import Scorer
from lora_jax.generate import make_generate_fn
from lora_jax.lora import LoraConfig, has_lora, merge_lora


def mc_docs(items: Sequence[ChoiceItem]) -> list[MCDoc]:
  return [MCDoc(contexts=(it.context,) * len(it.choices), continuations=tuple(it.choices),
                choice_texts=tuple(it.choices), gold=it.gold, fewshot_delimiter="\n",
                where=f"source:{i}") for i, it in enumerate(items)]


class DemoEvaluator:
  """`evaluator(params, lora_config) -> {"target": {"acc"}, "source": {"acc", "stderr"}}`."""

  def __init__(self, model_config: LlamaConfig, tokenizer: Any, source_items: Sequence[ChoiceItem],
               target_examples: Sequence[Example], *, batch_size: int = 128):
    self.config, self.tokenizer = model_config, tokenizer
    self.source_docs = mc_docs(source_items)
    self.target_examples = list(target_examples)
    self.batch_size = int(batch_size)
    self.max_new_tokens = max(len(tokenizer.encode(ex.response)) for ex in target_examples) + 1
    self._scorer: Scorer | None = None

  def _merged(self, params: Any, lora_config: LoraConfig | None) -> Any:
    if lora_config is not None and has_lora(params):
      return merge_lora(params, lora_config)
    return params

  def _get_scorer(self, params: Any) -> Scorer:
    if self._scorer is None:
      self._scorer = Scorer(self.config, params, None, self.tokenizer,
                            batch_size=self.batch_size)
    self._scorer.params = params  # one Scorer (one jit) for every evaluation
    return self._scorer

  def source_accuracy(self, params: Any) -> dict:
    entries, _ = evaluate_multiple_choice("source", self._get_scorer(params), self.source_docs,
                                          num_fewshot=0, headline="acc", source="demo")
    acc = next(e for e in entries if e["metric"] == "acc")
    return {"acc": acc["value"], "stderr": acc["stderr"], "n": acc["n"]}

  def target_loss(self, params: Any) -> float:
    """Mean NLL per response token (+ EOS) of the held-out target set: the LR-selection metric."""
    scorer = self._get_scorer(params)
    eos = int(self.tokenizer.eos_id)
    encoded = [(c, list(x) + [eos]) for c, x in
               (scorer.encode(ex.prompt, ex.response) for ex in self.target_examples)]
    scores = scorer.score_ids(encoded)
    return -sum(x.logprob for x in scores) / max(sum(x.n_tokens for x in scores), 1)

  def target_accuracy(self, params: Any) -> dict:
    generate = make_generate_fn(self.config, params, None, self.tokenizer,
                                batch_size=self.batch_size)
    outs = generate([ex.prompt for ex in self.target_examples], temperature=0.0,
                    max_new_tokens=self.max_new_tokens)
    completions = [o[0] for o in outs]
    return {"acc": exact_match_accuracy(self.target_examples, completions),
            "n": len(completions)}

  def sample(self, params: Any, lora_config: LoraConfig | None, examples: Sequence[Example], *,
             n: int, temperature: float, top_p: float, seed: int) -> list[list[str]]:
    """`n` sampled completions per prompt of `examples` (through `generate`, as HumanEval's
    pass@1 samples are drawn), for the diversity count."""
    # n rows per prompt: batches of several prompts' samples (fewer, larger device calls)
    generate = make_generate_fn(self.config, self._merged(params, lora_config), None,
                                self.tokenizer, batch_size=max(self.batch_size, 4 * n))
    return generate([ex.prompt for ex in examples], n=n, temperature=temperature, top_p=top_p,
                    max_new_tokens=self.max_new_tokens, seed=seed)

  def __call__(self, params: Any, lora_config: LoraConfig | None = None) -> dict:
    merged = self._merged(params, lora_config)
    target = self.target_accuracy(merged)
    target["loss"] = self.target_loss(merged)
    return {"target": target, "source": self.source_accuracy(merged)}


def diversity_counts(examples: Sequence[Example], samples: Sequence[Sequence[str]]) -> dict:
  """Unique strings among the samples of each prompt, counted by `evals.diversity.unique_counts`
  as the paper counts HumanEval generations, correct ("passing") and incorrect samples
  separately; surrounding whitespace is ignored, as exact match ignores it. A target prompt has
  one correct answer, so `unique_correct` is 0 or 1 per prompt: the informative counts are
  `unique_incorrect` and `unique` (all samples)."""
  if len(examples) != len(samples):
    raise ValueError(f"{len(examples)} examples but {len(samples)} sample lists")
  rows = [{"task_id": i, "completion": o.strip(), "passed": o.strip() == ex.response}
          for i, (ex, outs) in enumerate(zip(examples, samples)) for o in outs]
  counts = unique_counts(rows)
  per_prompt = [counts.get(i, {g: {"unique": 0, "total": 0} for g in GROUPS})
                for i in range(len(examples))]
  unique = [c["all"]["unique"] for c in per_prompt]
  unique_incorrect = sum(c["failing"]["unique"] for c in per_prompt)
  n_correct = sum(c["passing"]["total"] for c in per_prompt)
  n, k = len(rows), max(len(examples), 1)
  return {"n_prompts": len(examples), "n_samples": n, "correct_fraction": n_correct / max(n, 1),
          "unique_total": sum(unique),
          "unique_correct_total": sum(c["passing"]["unique"] for c in per_prompt),
          "unique_incorrect_total": unique_incorrect, "unique_mean": sum(unique) / k,
          "unique_incorrect_mean": unique_incorrect / k, "per_prompt_unique": unique}
