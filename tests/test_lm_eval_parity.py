"""BOS handling of log-likelihood requests: the tokenizer's own setting by default, and the same
scores as lm-evaluation-harness (lm-eval) with the same BOS choice, in both settings."""

import json
import os

import pytest

from _hf_support import tiny_hf_llama

from lora_jax.data.tokenizers import load_tokenizer
from lora_jax.evals.scoring import encode_pair

REQUESTS = [("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
            ("", "Hello there"),  # empty context: lm-eval's prefix token alone
            ("The cat sat on ", "the mat"),  # trailing space moves onto the continuation
            ("She poured water into the glass until it", " overflowed.")]


def byte_bpe_tokenizer(d, *, bos_in_template=True, add_bos_token=None):
  """A byte-level tokenizer.json ("<unk>", "<s>", "</s>" + 256 bytes) and tokenizer_config.json."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, processors
  specials = ["<unk>", "<s>", "</s>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  if bos_in_template:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  os.makedirs(d, exist_ok=True)
  tok.save(os.path.join(d, "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}
  if add_bos_token is not None:
    cfg["add_bos_token"] = add_bos_token
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f)
  return d


@pytest.mark.parametrize("template, config, want", [
    (True, None, True),     # the post-processor prepends <s>
    (False, None, False),   # no BOS in the template
    (True, False, False),   # tokenizer_config.json's add_bos_token wins (HF LlamaTokenizerFast)
    (False, True, True),
])
def test_add_bos_follows_the_tokenizer(tmp_path, template, config, want):
  tok = load_tokenizer(byte_bpe_tokenizer(str(tmp_path), bos_in_template=template,
                                          add_bos_token=config))
  assert tok.add_bos is want and tok.bos_id == 1
  assert tok.encode("ab")[:1] != [1]  # encode never adds special tokens itself


def test_request_construction_as_lm_eval_documents(tmp_path):
  """lm-eval `_encode_pair`: whole = enc(ctx + cont), ctx = enc(ctx), cont = whole[len(ctx):],
  with BOS on both when add_bos_token; an empty context is [prefix token] + enc(cont)."""
  tok = load_tokenizer(byte_bpe_tokenizer(str(tmp_path)))
  ctx, cont = encode_pair(tok, "The cat sat on ", "the mat", add_bos=False)
  assert ctx == tok.encode("The cat sat on") and cont == tok.encode(" the mat")
  ctx_b, cont_b = encode_pair(tok, "The cat sat on ", "the mat", add_bos=True)
  assert ctx_b == [tok.bos_id] + ctx and cont_b == cont
  for add_bos in (False, True):
    assert encode_pair(tok, "", "Hi", add_bos=add_bos) == ([tok.bos_id], tok.encode("Hi"))


@pytest.mark.interop
def test_scores_equal_lm_eval_with_the_same_bos_choice(tmp_path):
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  from lora_jax.evals.scoring import Scorer
  from lora_jax.interop.hf import load_hf

  path = str(tmp_path / "model")
  tiny_hf_llama(path, bos_token_id=1, eos_token_id=2)
  byte_bpe_tokenizer(path)  # Llama-2-like: the tokenizer adds BOS
  tok = load_tokenizer(path)
  config, params = load_hf(path)
  ours = {add: Scorer(config, params, None, tok, batch_size=2, add_bos=add).score(REQUESTS)
          for add in (None, False, True)}
  assert [s.logprob for s in ours[None]] == [s.logprob for s in ours[True]]  # tokenizer: BOS
  instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
  for lm_eval_bos in (False, True):  # False is lm-eval's default
    lm = HFLM(pretrained=path, tokenizer=path, batch_size=1, device="cpu", dtype="float32",
              add_bos_token=lm_eval_bos)
    ref = lm.loglikelihood(instances, disable_tqdm=True)
    for (lp, greedy), s in zip(ref, ours[lm_eval_bos]):
      assert s.logprob == pytest.approx(lp, abs=1e-4) and s.is_greedy == greedy
  # the two settings differ (except the empty context, which is BOS-prefixed either way)
  assert abs(ours[False][0].logprob - ours[True][0].logprob) > 1e-3
