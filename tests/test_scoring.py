"""Log-likelihood scoring against a direct log-softmax; lm-eval tokenization of pairs."""

import functools
import os

import jax
import numpy as np
import pytest

from _hf_support import tiny_hf_llama

from lora_jax.config import preset
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.evals.scoring import Scorer, encode_pair, split_whitespace
from lora_jax.lora import LoraConfig, add_lora
from lora_jax.model import Llama, init_params

CFG = preset("tiny")
TOK = ByteTokenizer()


class WordTokenizer:
  """Splits on spaces and keeps the space on the following word (like BPE's 'Ġword')."""
  bos_id, eos_id, pad_id, vocab_size = None, 2, 0, 1000

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    pieces, cur = [], ""
    for ch in text:
      if ch == " " and cur:
        pieces.append(cur)
        cur = ""
      cur += ch
    if cur:
      pieces.append(cur)
    return [self.vocab.setdefault(p, len(self.vocab) + 3) for p in pieces]


@pytest.fixture(scope="module")
def lora_params():
  lora = LoraConfig(rank=2, targets="attention")
  base = jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))
  p = add_lora(base, lora, jax.random.key(1))
  p = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.2 * np.ones(x.shape, x.dtype) if path[-1].key == "lora_b" else x, p)
  return p, lora


@functools.lru_cache(maxsize=None)
def _full_forward(lora):
  model = Llama(CFG, lora=lora)
  return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t), axis=-1))


def _direct(params, lora, ids, n_cont, width=64):
  """Sum of log_softmax over the continuation, from one plain forward pass (right-padded)."""
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids) - 1] = ids[:-1]
  logp = np.asarray(_full_forward(lora)(params, tokens)[0], np.float64)
  tgt = ids[1:]
  rows = range(len(tgt) - n_cont, len(tgt))
  return (sum(float(logp[i, tgt[i]]) for i in rows),
          all(int(np.argmax(logp[i])) == tgt[i] for i in rows))


def test_scores_match_direct_log_softmax(lora_params):
  params, lora = lora_params
  scorer = Scorer(CFG, params, lora, TOK, batch_size=4)
  before = sum(scorer.trace_count.values())
  reqs = [("Question: 2+2?\nAnswer:", " 4"), ("The cat", " sat on the mat."), ("", "hello"),
          ("A longer context that needs a bigger bucket, really. ", "end"), ("x", "y")]
  got = scorer.score(reqs)
  for (ctx, cont), s in zip(reqs, got):
    c, x = encode_pair(TOK, ctx, cont)
    lp, greedy = _direct(params, lora, c + x, len(x))
    assert s.n_tokens == len(x)
    assert abs(s.logprob - lp) < 1e-4 and s.is_greedy == greedy
  assert got[0].logprob < 0
  # LoRA changes the scores: the base model gives different numbers.
  base = Scorer(CFG, params, None, TOK, batch_size=4).score(reqs[:1])
  assert abs(base[0].logprob - got[0].logprob) > 1e-3
  # Buckets (4, 64) and (1, 16), not one shape per row; at most those two new traces.
  assert sum(scorer.trace_count.values()) - before <= 2


def test_greedy_flag_true_for_argmax_continuation(lora_params):
  params, lora = lora_params
  ctx = [1] + TOK.encode("Once upon")
  ids = list(ctx)
  for _ in range(3):
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :len(ids)] = ids
    ids.append(int(np.argmax(_full_forward(lora)(params, tokens)[0, len(ids) - 1])))
  scorer = Scorer(CFG, params, lora, TOK, batch_size=4)
  s = scorer.score_ids([(ctx, ids[len(ctx):]), (ctx, [ids[len(ctx)] + 1])])
  assert s[0].is_greedy and not s[1].is_greedy and s[0].n_tokens == 3


def test_truncation_keeps_the_end(lora_params):
  params, lora = lora_params
  scorer = Scorer(CFG, params, lora, TOK, batch_size=4, max_length=8)
  ctx, cont = [1] + list(range(10, 30)), [40, 41]
  s = scorer.score_ids([(ctx, cont)])[0]
  lp, _ = _direct(params, lora, (ctx + cont)[-9:], 2)
  assert s.n_tokens == 2 and abs(s.logprob - lp) < 1e-4


def test_split_whitespace_and_encode_pair():
  assert split_whitespace("Answer: ", "Paris") == ("Answer:", " Paris")
  assert split_whitespace("a\n\n", "b") == ("a", "\n\nb")
  assert split_whitespace("a", " b") == ("a", " b")
  tok = WordTokenizer()
  ctx, cont = encode_pair(tok, "The capital is ", "Paris", add_bos=True)  # no BOS: none added
  assert [tok.encode(" Paris")[0]] == cont
  assert ctx == tok.encode("The capital is")
  # Empty context: EOS stands in as the prefix token when there is no BOS.
  assert encode_pair(tok, "", "Hi")[0] == [2]
  # Byte tokenizer: BOS prepended, or not.
  assert encode_pair(TOK, "ab", "c") == ([1] + TOK.encode("ab"), TOK.encode("c"))
  assert encode_pair(TOK, "ab", "c", add_bos=False) == (TOK.encode("ab"), TOK.encode("c"))


def test_boundary_merge_counts_in_continuation():
  """A token spanning the boundary belongs to the continuation (whole-string encoding)."""
  class MergeTok(WordTokenizer):
    def encode(self, text):
      return [9] if text == "ab" else [5 + ord(c) for c in text]
  ctx, cont = encode_pair(MergeTok(), "a", "b", add_bos=False)
  assert ctx == [5 + ord("a")] and cont == []  # whole "ab" is one token: nothing left to split


# --------------------------------------------------------------------------- interop
@pytest.mark.interop
def test_choice_loglikelihoods_match_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  from lora_jax.evals import multiple_choice as mc
  from lora_jax.evals.task_data import read_rows
  from lora_jax.interop.hf import load_hf
  path = str(tmp_path / "hf-tiny")
  model = tiny_hf_llama(path)
  config, params = load_hf(path)
  fix = os.path.join(os.path.dirname(__file__), "fixtures", "evals")
  docs = mc.parse_docs("arc_challenge", read_rows(fix + "/arc_challenge/test.jsonl"))[:2]
  docs += mc.parse_docs("winogrande", read_rows(fix + "/winogrande/validation.jsonl"))[:2]
  requests = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]
  ours = Scorer(config, params, None, TOK, batch_size=4).score(requests)
  worst = 0.0
  for (ctx, cont), s in zip(requests, ours):
    c, x = encode_pair(TOK, ctx, cont)
    with torch.no_grad():
      logits = model(torch.tensor([c + x])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    ref = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x))
    worst = max(worst, abs(ref - s.logprob))
  print(f"max |ours - transformers| per-choice log-likelihood: {worst:.2e}")
  assert worst < 1e-4, worst
