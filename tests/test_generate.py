"""Generation: cached decode == full recompute, buckets compile once, sampling filters, stops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _hf_support import tiny_hf_llama

from lora_jax.config import preset
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.generate import (Generator, SamplingConfig, bucket_batch, bucket_length,
                               continuation_text, filter_logits, first_stop, make_generate_fn)
from lora_jax.lora import LoraConfig, add_lora
from lora_jax.model import Llama, init_params

CFG = preset("tiny")
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def base_params():
  return jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))


@pytest.fixture(scope="module")
def lora_setup(base_params):
  lora = LoraConfig(rank=4, targets="all")
  params = add_lora(base_params, lora, jax.random.key(1))
  # Non-zero B so the adapter actually changes the model.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.3 * jax.random.normal(jax.random.key(hash(str(path)) % 1000), x.shape)
                       if str(path[-1].key) == "lora_b" else x), params)
  return params, lora


@functools.lru_cache(maxsize=None)
def _full_forward(lora):
  model = Llama(CFG, lora=lora)
  return jax.jit(lambda p, t, seg: model.apply({"params": p}, t, None, seg))


def _reference_greedy(params, lora, prompt_ids, steps, width=32):
  """Recomputes the whole forward pass at every step (no cache; right-padded to one width)."""
  fwd = _full_forward(lora)
  ids = list(prompt_ids)
  out = []
  for _ in range(steps):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    seg = (np.arange(width) < len(ids)).astype(np.int32)[None]
    logits = fwd(params, tokens, seg)
    nxt = int(jnp.argmax(logits[0, len(ids) - 1]))
    out.append(nxt)
    ids.append(nxt)
  return out


PROMPTS = [[1, 40, 41, 42], [1] + list(range(50, 60)), [1, 70], [1] + list(range(80, 93))]


@pytest.mark.parametrize("use_lora", [False, True])
def test_cached_greedy_matches_full_recompute(base_params, lora_setup, use_lora):
  params, lora = lora_setup if use_lora else (base_params, None)
  gen = Generator(CFG, params, lora, TOK, batch_size=4, eos_ids=())
  got = gen.generate_tokens(PROMPTS, max_new_tokens=8)
  for prompt, toks in zip(PROMPTS, got):
    assert toks == _reference_greedy(params, lora, prompt, 8)


def test_lora_changes_output_and_merge_matches_unmerged(base_params, lora_setup):
  params, lora = lora_setup
  unmerged = Generator(CFG, params, lora, TOK, batch_size=4, eos_ids=())
  merged = Generator(CFG, params, lora, TOK, batch_size=4, eos_ids=(), merge=True)
  base = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=())
  a = unmerged.generate_tokens(PROMPTS, max_new_tokens=8)
  assert a == merged.generate_tokens(PROMPTS, max_new_tokens=8)
  assert a != base.generate_tokens(PROMPTS, max_new_tokens=8)
  assert merged.lora_config is None and unmerged.lora_config is lora


def test_compiles_once_per_bucket(base_params):
  gen = Generator(CFG, base_params, None, TOK, batch_size=2, eos_ids=(7,))
  before = dict(gen.trace_counts)
  delta = lambda k: gen.trace_counts[k] - before.get(k, 0)  # noqa: E731
  # Five prompts of lengths 3..9 share the 16-token bucket: batches of 2, 2 and 1 (bucket 1).
  prompts = [[1] + [60 + j for j in range(n)] for n in (2, 4, 5, 7, 8)]
  gen.generate_tokens(prompts, max_new_tokens=4)
  assert (delta("prefill"), delta("decode")) == (2, 2)  # batch buckets 2 and 1
  gen.generate_tokens(prompts[::-1], max_new_tokens=4)
  assert (delta("prefill"), delta("decode")) == (2, 2)
  gen.generate_tokens([[1] + [60] * 20], max_new_tokens=4)  # new 32-token bucket, batch 1
  assert (delta("prefill"), delta("decode")) == (3, 3)


def test_buckets():
  assert [bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 1100)] == [
      16, 16, 32, 128, 512, 1024, 1536]
  assert [bucket_batch(n, 8) for n in (1, 3, 5, 8, 20)] == [1, 4, 8, 8, 8]
  assert bucket_batch(3, 8, multiple=4) == 4 and bucket_batch(1, 8, multiple=4) == 4


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda f: np.isfinite(np.asarray(f))[0].tolist()  # noqa: E731
  assert keep(filter_logits(logits, 1.0, 1.0, 0)) == [True] * 4
  assert keep(filter_logits(logits, 1.0, 1.0, 2)) == [True, True, False, False]
  assert keep(filter_logits(logits, 1.0, 0.5, 0)) == [True, False, False, False]
  assert keep(filter_logits(logits, 1.0, 0.8, 0)) == [True, True, False, False]
  assert keep(filter_logits(logits, 1.0, 0.81, 0)) == [True, True, True, False]
  assert keep(filter_logits(logits, 1.0, 0.95, 1)) == [True, False, False, False]


def test_sampling_reproducible_and_batch_independent(base_params):
  s = SamplingConfig(temperature=1.0, top_p=0.95)
  a = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=()).generate_tokens(
      PROMPTS, max_new_tokens=8, sampling=s, seed=3)
  b = Generator(CFG, base_params, None, TOK, batch_size=2, eos_ids=()).generate_tokens(
      PROMPTS, max_new_tokens=8, sampling=s, seed=3)
  c = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=()).generate_tokens(
      PROMPTS, max_new_tokens=8, sampling=s, seed=4)
  assert a == b and a != c
  top1 = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=()).generate_tokens(
      PROMPTS, max_new_tokens=8, sampling=SamplingConfig(temperature=1.0, top_k=1), seed=3)
  greedy = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=()).generate_tokens(
      PROMPTS, max_new_tokens=8)
  assert top1 == greedy


def test_eos_ends_row(base_params):
  gen = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=())
  free = gen.generate_tokens(PROMPTS, max_new_tokens=8)
  eos = free[0][3]
  stopped = Generator(CFG, base_params, None, TOK, batch_size=4, eos_ids=(eos,)).generate_tokens(
      PROMPTS, max_new_tokens=8)
  for f, s in zip(free, stopped):
    cut = f.index(eos) if eos in f else len(f)
    assert s == f[:cut]
  assert len(stopped[0]) == free[0].index(eos) < 8


def test_stop_strings_and_generate_fn(base_params):
  fn = make_generate_fn(CFG, base_params, None, TOK, batch_size=4, chunk_size=3, eos_ids=())
  prompts = ["def f(x):\n", "Question: 1+1?\nAnswer:", "abc"]
  free = fn(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=8, stop=[], seed=0)
  assert [len(o) for o in free] == [1, 1, 1] and all(isinstance(o[0], str) for o in free)
  stop = free[1][0][2:4]
  assert len(stop) == 2
  cut = fn(prompts, n=2, temperature=0.0, top_p=1.0, max_new_tokens=8, stop=[stop], seed=0)
  for f, c in zip(free, cut):
    i = f[0].find(stop)
    assert c == [f[0] if i < 0 else f[0][:i]] * 2
  sampled = fn(prompts[:2], n=3, temperature=0.8, top_p=0.95, max_new_tokens=8, stop=[], seed=1)
  assert [len(s) for s in sampled] == [3, 3]


def test_text_helpers():
  assert first_stop("abc\ndef\nclass X", ["\nclass", "\ndef"]) == 3
  assert first_stop("abc", ["x"]) is None
  ids = TOK.encode("Hello")
  assert continuation_text(TOK, [1] + ids, TOK.encode(" world")) == " world"


@pytest.mark.interop
def test_greedy_generation_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")

  from lora_jax.interop.hf import load_hf
  model = tiny_hf_llama(tmp_path / "hf")
  config, params = load_hf(str(tmp_path / "hf"))
  prompts = [[1] + TOK.encode("def add(a, b):"), [1] + TOK.encode("Q: 2+2?"), [1, 70]]
  ours = Generator(config, params, None, TOK, batch_size=4, eos_ids=()).generate_tokens(
      prompts, max_new_tokens=8)
  for p, got in zip(prompts, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                           attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert got == ref[0, len(p):].tolist()


_MESH_SCRIPT = r"""
import jax, numpy as np
from lora_jax.config import preset
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.evals.scoring import Scorer
from lora_jax.generate import Generator
from lora_jax.model import init_params
from lora_jax.sharding import make_mesh
cfg, tok = preset("tiny"), ByteTokenizer()
p = init_params(cfg, jax.random.key(0))
prompts, reqs = [[1, 40, 41], [1, 50], [1, 60, 61, 62]], [("ab", "c"), ("x", "yz"), ("q", "r")]
ref = Generator(cfg, p, None, tok, batch_size=4, eos_ids=()).generate_tokens(
    prompts, max_new_tokens=4)
ref_s = [s.logprob for s in Scorer(cfg, p, None, tok, batch_size=4).score(reqs)]
for shape in ({"data": 2, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 2}):
  mesh = make_mesh(shape)
  got = Generator(cfg, p, None, tok, batch_size=4, eos_ids=(), mesh=mesh).generate_tokens(
      prompts, max_new_tokens=4)
  got_s = [s.logprob for s in Scorer(cfg, p, None, tok, batch_size=4, mesh=mesh).score(reqs)]
  assert got == ref, (shape, got, ref)
  assert np.allclose(got_s, ref_s, atol=1e-5), (shape, got_s, ref_s)
print("MESH OK")
"""


def test_generation_and_scoring_on_a_mesh():
  """Two fake CPU devices: data-parallel rows and tensor-sharded params give the same results."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
  assert "MESH OK" in out.stdout, out.stderr[-3000:]
