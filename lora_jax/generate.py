"""KV-cache text generation: bucketed prefill, a `lax.while_loop` decode, host-side stop strings.

Prompts are left-padded (segment id 0 on pads, per-row positions starting at 0 at the first real
token) because the cache's write index is shared by all rows. Batch size and prompt length are
padded to buckets, so a run compiles once per (batch bucket, prompt-length bucket, new-token
budget, greedy or sampled) and never per prompt; `Generator.trace_counts` counts the traces.

Decoding runs on device in chunks of `chunk_size` steps; between chunks the host decodes the new
text, checks the stop strings and marks finished rows, and the loop ends early once every row is
done (EOS or a stop string). Sampling: greedy (temperature 0) or temperature + top-k + top-p; each
row's random stream depends only on (seed, prompt index, sample index), never on the batching.

`make_generate_fn(...)` returns the `generate_fn(prompts, *, n, temperature, top_p,
max_new_tokens, stop, seed)` callable the HumanEval and GSM8K evals use.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.config import LlamaConfig
from lora_jax.lora import LoraConfig, has_lora, merge_lora
from lora_jax.model import Llama, init_kv_cache

Array = jax.Array
GenerateFn = Callable[..., list[list[str]]]


# --------------------------------------------------------------------------- buckets
def bucket_length(n: int, minimum: int = 16, step_above: int = 512) -> int:
  """Next power of two >= n (at least `minimum`), then multiples of `step_above`."""
  n = max(int(n), 1)
  if n <= step_above:
    return max(minimum, 1 << (n - 1).bit_length())
  return int(math.ceil(n / step_above) * step_above)


def bucket_batch(n: int, batch_size: int, multiple: int = 1) -> int:
  """Power of two >= n capped at `batch_size`, rounded up to a multiple of `multiple`."""
  b = min(batch_size, 1 << (max(n, 1) - 1).bit_length())
  return int(math.ceil(b / multiple) * multiple)


# --------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits_BV: Array, temperature, top_p, top_k) -> Array:
  """Temperature-scaled logits with everything outside the top-k / top-p set at -inf.

  top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (HF's rule: a
  token survives when the mass of the tokens ranked above it is < top_p). Ties at the threshold
  are kept. `top_k` <= 0 disables top-k.
  """
  logits = logits_BV.astype(jnp.float32) / temperature
  V = logits.shape[-1]
  sorted_BV = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  rank_V = jnp.arange(V)
  sorted_BV = jnp.where(rank_V < k, sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = (mass_before_BV < top_p) & (rank_V < k)
  keep_BV = keep_BV.at[:, 0].set(True)
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold_B1, logits, -jnp.inf)


def sample_tokens(logits_BV: Array, row_ids_B: Array, step, seed, temperature, top_p, top_k,
                  greedy: bool) -> Array:
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BV, temperature, top_p, top_k)
  base = jax.random.key(seed)
  keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids_B)
  return jax.vmap(jax.random.categorical)(keys_B, filtered).astype(jnp.int32)


# --------------------------------------------------------------------------- mesh
def place_on_mesh(config: LlamaConfig, params: Any, lora: LoraConfig | None, mesh: Any):
  """(batch sharding, batch multiple, params placed with the training layout).

  Batches split over the mesh's data-parallel axes ("data", "fsdp"); params follow
  `lora_jax.sharding.RULES` (a no-op for params already placed that way). The mesh should
  have Auto axis types, as `lora_jax.sharding.make_mesh` builds it.
  """
  from jax.sharding import NamedSharding, PartitionSpec

  from lora_jax import sharding
  from lora_jax.model import param_logical_axes
  shardings = sharding.tree_shardings(params, param_logical_axes(config, lora), mesh)
  batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))  # leading dim, any rank
  return batch, sharding.data_parallel_size(mesh), sharding.put_tree(params, shardings)


# --------------------------------------------------------------------------- device functions
_DEVICE_FNS: dict = {}


def _device_fns(config: LlamaConfig, lora: LoraConfig | None, eos_ids: tuple, pad_id: int,
                cache_dtype, platform: str) -> tuple[Callable, Callable, collections.Counter]:
  """Jitted (prefill, decode) for one model shape and platform, shared by every Generator using
  it.

  Sharing the jitted functions shares XLA's compile cache; the Counter counts traces (one per
  compiled shape) and is what the tests read.
  """
  key = (repr(config), repr(lora), eos_ids, pad_id, str(cache_dtype), platform)
  if key in _DEVICE_FNS:
    return _DEVICE_FNS[key]
  model = Llama(config, lora=lora, platform=platform)
  counts: collections.Counter = collections.Counter()
  eos_E = np.asarray(eos_ids, np.int32)

  def prefill(params, tokens_BP, positions_BP, segments_BP, row_ids_B, seed, temperature, top_p,
              top_k, *, greedy: bool, cache_len: int):
    counts["prefill"] += 1
    cache = init_kv_cache(config, tokens_BP.shape[0], cache_len, cache_dtype)
    # Left padding: the last column is every row's last real token, the only logits needed.
    logits_B1V, cache = model.apply({"params": params}, tokens_BP, positions_BP, segments_BP,
                                    kv_cache=cache, last_only=True)
    tok_B = sample_tokens(logits_B1V[:, 0], row_ids_B, 0, seed, temperature, top_p, top_k, greedy)
    return cache, tok_B

  def decode(params, state, stop_at, row_ids_B, seed, temperature, top_p, top_k, *,
             greedy: bool):
    """Decode steps until `state["step"] == stop_at` or every row is done."""
    counts["decode"] += 1

    def cond(s):
      return (s["step"] < stop_at) & ~jnp.all(s["done_B"])

    def body(s):
      B = s["tok_B"].shape[0]
      logits_B1V, cache = model.apply(
          {"params": params}, s["tok_B"][:, None], s["pos_B"][:, None],
          jnp.ones((B, 1), jnp.int32), kv_cache=s["cache"])
      nxt_B = sample_tokens(logits_B1V[:, 0], row_ids_B, s["step"], seed, temperature, top_p,
                            top_k, greedy)
      nxt_B = jnp.where(s["done_B"], pad_id, nxt_B)
      out_BT = jax.lax.dynamic_update_slice(s["out_BT"], nxt_B[:, None], (0, s["step"]))
      done_B = s["done_B"] | jnp.isin(nxt_B, jnp.asarray(eos_E))
      return dict(cache=cache, tok_B=nxt_B, pos_B=s["pos_B"] + 1, step=s["step"] + 1,
                  done_B=done_B, out_BT=out_BT)

    return jax.lax.while_loop(cond, body, state)

  donate = () if platform == "cpu" else (1,)  # the state (KV cache) is reused; CPU cannot donate
  fns = (jax.jit(prefill, static_argnames=("greedy", "cache_len")),
         jax.jit(decode, static_argnames=("greedy",), donate_argnums=donate), counts)
  _DEVICE_FNS[key] = fns
  return fns


# --------------------------------------------------------------------------- generator
@dataclasses.dataclass
class _Batch:
  rows: list[int]          # indices into the flat row list
  prompt_len: int          # bucketed prompt length P
  batch: int               # bucketed batch size B


class Generator:
  """Batched generation for one model; see the module docstring.

  `params` may carry LoRA leaves: with `merge=False` they are applied unmerged (the model is
  built with `lora_config`), with `merge=True` they are folded into the kernels once up front.
  `platform` (default: the mesh's, else jax's devices') picks the model's kernels.
  """

  def __init__(self, config: LlamaConfig, params: Any, lora_config: LoraConfig | None = None,
               tokenizer: Any = None, *, batch_size: int = 8, mesh: Any = None,
               merge: bool = False, add_bos: bool = True, chunk_size: int = 32,
               cache_dtype: Any = None, eos_ids: Sequence[int] | None = None,
               platform: str | None = None):
    if lora_config is not None and has_lora(params) and merge:
      params, lora_config = merge_lora(params, lora_config), None
    if lora_config is not None and not has_lora(params):
      lora_config = None
    self.config = config
    self.lora_config = lora_config
    self.tokenizer = tokenizer
    self.batch_size = int(batch_size)
    self.mesh = mesh
    self.add_bos = add_bos
    self.chunk_size = int(chunk_size)
    self.cache_dtype = cache_dtype
    eos = set(eos_ids) if eos_ids is not None else {config.eos_token_id}
    if tokenizer is not None and eos_ids is None and tokenizer.eos_id is not None:
      eos.add(int(tokenizer.eos_id))
    self.eos_ids = tuple(sorted(int(e) for e in eos))
    self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
    self._batch_multiple = 1
    self._data_sharding = None
    if mesh is not None:
      self._data_sharding, self._batch_multiple, params = place_on_mesh(
          config, params, lora_config, mesh)
    self.params = params
    self._prefill, self._decode, self.trace_counts = _device_fns(
        config, lora_config, self.eos_ids, self.pad_id, cache_dtype,
        ops.resolve_platform(platform, mesh))

  # ------------------------------------------------------------------ host API
  def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
    ids = list(self.tokenizer.encode(prompt))
    if self.add_bos and self.tokenizer.bos_id is not None:
      ids = [int(self.tokenizer.bos_id)] + ids
    limit = self.config.max_position_embeddings - max_new_tokens
    if limit > 0 and len(ids) > limit:
      ids = ids[-limit:]  # keep the end of an over-long prompt, as lm-eval does
    return ids or [int(self.tokenizer.bos_id or 0)]

  def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                      sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                      row_ids: Sequence[int] | None = None,
                      is_done: Callable[[int, list[int]], bool] | None = None,
                      progress: Any = None) -> list[list[int]]:
    """New token ids for each prompt, ending at (and excluding) the first EOS.

    `row_ids` fix each row's random stream (default: its index). `is_done(row, tokens)` is
    called on the host between decode chunks; returning True stops that row.
    """
    n_rows = len(prompt_ids)
    row_ids = list(range(n_rows)) if row_ids is None else list(row_ids)
    T = int(max_new_tokens)
    if T < 1:
      return [[] for _ in range(n_rows)]
    order = sorted(range(n_rows), key=lambda i: -len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in range(n_rows)]
    for start in range(0, n_rows, self.batch_size):
      rows = order[start:start + self.batch_size]
      P = bucket_length(max(len(prompt_ids[i]) for i in rows))
      B = bucket_batch(len(rows), self.batch_size, self._batch_multiple)
      out = self._run_batch(_Batch(rows, P, B), prompt_ids, row_ids, T, sampling, seed, is_done)
      for i, toks in zip(rows, out):
        results[i] = toks
      if progress is not None:
        progress.update(len(rows))
    return results

  def _run_batch(self, batch: _Batch, prompt_ids, row_ids, T, sampling, seed, is_done):
    B, P, rows = batch.batch, batch.prompt_len, batch.rows
    tokens = np.full((B, P), self.pad_id, np.int32)
    positions = np.zeros((B, P), np.int32)
    segments = np.zeros((B, P), np.int32)
    rids = np.zeros((B,), np.int32)
    lengths = np.zeros((B,), np.int32)
    for b in range(B):
      i = rows[min(b, len(rows) - 1)]  # filler rows repeat the last prompt
      ids = prompt_ids[i]
      n = len(ids)
      tokens[b, P - n:] = ids
      positions[b, P - n:] = np.arange(n)
      segments[b, P - n:] = 1
      rids[b] = row_ids[i]
      lengths[b] = n
    put = self._put
    scalars = (jnp.int32(seed), jnp.float32(max(sampling.temperature, 1e-6)),
               jnp.float32(sampling.top_p), jnp.int32(sampling.top_k))
    rids_B = put(rids)
    cache, tok_B = self._prefill(self.params, put(tokens), put(positions), put(segments), rids_B,
                                 *scalars, greedy=sampling.greedy, cache_len=P + T)
    out_BT = jnp.zeros((B, T), jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, jnp.asarray(self.eos_ids, jnp.int32))
    done_B = done_B | put(np.arange(B) >= len(rows))
    state = dict(cache=cache, tok_B=tok_B, pos_B=put(lengths), step=jnp.int32(1),
                 done_B=done_B, out_BT=out_BT)
    chunk = T if is_done is None else self.chunk_size
    step = 1
    while True:
      if step >= T:
        break
      step = min(step + chunk, T)
      state = self._decode(self.params, state, jnp.int32(step), rids_B, *scalars,
                           greedy=sampling.greedy)
      out_np, done_np = np.asarray(state["out_BT"]), np.array(state["done_B"])
      step = int(state["step"])
      if is_done is not None:
        changed = False
        for b, i in enumerate(rows):
          if not done_np[b] and is_done(i, _until_eos(out_np[b, :step], self.eos_ids)):
            done_np[b], changed = True, True
        if changed:
          state["done_B"] = put(done_np)
      if done_np.all():
        break
    out_np = np.asarray(state["out_BT"])
    return [_until_eos(out_np[b, :step], self.eos_ids) for b in range(len(rows))]

  def _put(self, x):
    x = jnp.asarray(x)
    if self._data_sharding is not None:
      return jax.device_put(x, self._data_sharding)
    return x

  def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
               stop: Sequence[str] = (), seed: int = 0, progress: Any = None) -> list[list[str]]:
    """`n` completions per prompt: the text after the prompt, cut at the first stop string."""
    sampling = SamplingConfig(temperature, top_p, top_k)
    if sampling.greedy and n > 1:
      n_unique = 1  # greedy samples are identical; decode once and repeat
    else:
      n_unique = n
    encoded = [self.encode_prompt(p, max_new_tokens) for p in prompts]
    flat_ids, flat_rows, owner = [], [], []
    for p, ids in enumerate(encoded):
      for s in range(n_unique):
        flat_ids.append(ids)
        flat_rows.append(p * n + s)
        owner.append(p)
    stop = [s for s in stop if s]

    def text_of(i, toks):
      return continuation_text(self.tokenizer, flat_ids[i], toks)

    def is_done(i, toks):
      return bool(stop) and first_stop(text_of(i, toks), stop) is not None

    toks = self.generate_tokens(flat_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                seed=seed, row_ids=flat_rows, is_done=is_done if stop else None,
                                progress=progress)
    out: list[list[str]] = [[] for _ in prompts]
    for i, t in enumerate(toks):
      text = text_of(i, t)
      cut = first_stop(text, stop)
      out[owner[i]].append(text if cut is None else text[:cut])
    if n_unique != n:
      out = [o * n for o in out]
    return out


def _until_eos(tokens, eos_ids) -> list[int]:
  out = []
  for t in tokens:
    t = int(t)
    if t in eos_ids:
      break
    out.append(t)
  return out


def continuation_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int],
                      context_tokens: int = 4) -> str:
  """Decoded text of `new_ids` as it reads after the prompt.

  Decoding the new ids alone loses a SentencePiece word-initial space; decoding a few prompt
  tokens with them and removing the prompt's own text keeps it.
  """
  tail = [int(t) for t in prompt_ids[-context_tokens:]]
  if tokenizer.bos_id is not None:
    tail = [t for t in tail if t != tokenizer.bos_id]
  full = tokenizer.decode(tail + [int(t) for t in new_ids])
  prefix = tokenizer.decode(tail)
  if full.startswith(prefix):
    return full[len(prefix):]
  return tokenizer.decode([int(t) for t in new_ids])


def first_stop(text: str, stop: Sequence[str]) -> int | None:
  """Index of the earliest occurrence of any stop string in `text`, or None."""
  hits = [text.find(s) for s in stop if s]
  hits = [h for h in hits if h >= 0]
  return min(hits) if hits else None


def make_generate_fn(config: LlamaConfig, params: Any, lora_config: LoraConfig | None,
                     tokenizer: Any, *, batch_size: int = 8, mesh: Any = None,
                     merge: bool = False, progress: bool = False, **kwargs) -> GenerateFn:
  """The `generate_fn(prompts, *, n, temperature, top_p, max_new_tokens, stop, seed)` of the evals.

  The returned function also exposes `.generator` (the `Generator`, e.g. for `trace_counts`).
  """
  gen = Generator(config, params, lora_config, tokenizer, batch_size=batch_size, mesh=mesh,
                  merge=merge, **kwargs)

  def generate_fn(prompts: list[str], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  max_new_tokens: int = 256, stop: Sequence[str] = (), seed: int = 0,
                  top_k: int = 0) -> list[list[str]]:
    bar = None
    if progress:
      from tqdm.auto import tqdm
      rows = len(prompts) * (1 if temperature == 0 else n)
      bar = tqdm(total=rows, desc="generate", unit="seq", leave=False)
    try:
      return gen.generate(prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                          max_new_tokens=max_new_tokens, stop=stop, seed=seed, progress=bar)
    finally:
      if bar is not None:
        bar.close()

  generate_fn.generator = gen
  return generate_fn
