"""Log-likelihood scoring of (context, continuation) pairs, tokenized as lm-evaluation-harness does.

For each pair: the summed log-probability of the continuation's tokens given the context, the
number of continuation tokens, and whether greedy decoding would have produced exactly them.

Tokenization (lm-eval `_encode_pair`): trailing whitespace of the context moves onto the
continuation; context + continuation is encoded whole and split where the context's own tokens end,
so a merge across the boundary is counted in the continuation. `add_bos` prepends the BOS token
(when the tokenizer has one); it defaults to the tokenizer's own setting (`tokenizer.add_bos`:
Llama-2's tokenizer adds BOS, as the MosaicML Gauntlet's requests then carry it), while lm-eval's HF
model adds none to log-likelihood requests unless `add_bos_token=True`: with the same choice the two
produce the same token ids. An empty context is lm-eval's prefix token alone: BOS, or EOS when the
tokenizer has no BOS. Over-long inputs keep their last `max_length` tokens.

Rows are sorted by length, right-padded (segment id 0) to a length bucket and a batch bucket, so
one evaluation compiles a handful of shapes; `Scorer.trace_count` counts them.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LlamaConfig
from lora_jax.generate import bucket_batch, bucket_length
from lora_jax.lora import LoraConfig, has_lora
from lora_jax.model import Llama
from lora_jax.ops import resolve_platform


class Score(NamedTuple):
  logprob: float     # sum of log p(continuation token | prefix)
  n_tokens: int      # continuation tokens scored
  is_greedy: bool    # every continuation token is the argmax


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
  """Moves the context's trailing whitespace to the front of the continuation (lm-eval)."""
  n = len(context) - len(context.rstrip())
  if n:
    return context[:-n], context[-n:] + continuation
  return context, continuation


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_bos: bool = True) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), split where the context's own tokens end."""
  context, continuation = split_whitespace(context, continuation)
  whole = list(tokenizer.encode(context + continuation))
  ctx = list(tokenizer.encode(context)) if context else []
  cont = whole[len(ctx):]
  bos = getattr(tokenizer, "bos_id", None)
  prefix: list[int] = []
  if add_bos and bos is not None:
    prefix = [int(bos)]
  elif not ctx:
    prefix = [int(tokenizer.eos_id if bos is None else bos)]
  return prefix + ctx, cont


def resolve_add_bos(tokenizer: Any, add_bos: bool | None) -> bool:
  """`add_bos` when given, else the tokenizer's own setting (True when it does not say)."""
  return bool(getattr(tokenizer, "add_bos", True)) if add_bos is None else bool(add_bos)


_SCORE_FNS: dict = {}


def _score_fn(config: LlamaConfig, lora: LoraConfig | None, platform: str, mesh: Any):
  """Jitted per-token log-probs for one model shape, platform and mesh, shared by every Scorer
  (one compile cache); the Counter counts traces by input shape."""
  key = (repr(config), repr(lora), platform, mesh)
  if key not in _SCORE_FNS:
    model = Llama(config, lora=lora, platform=platform, mesh=mesh)
    counts: collections.Counter = collections.Counter()

    def token_logprobs(params, inputs_BL, targets_BL, segments_BL):
      counts[inputs_BL.shape] += 1
      logits_BLV = model.apply({"params": params}, inputs_BL, None, segments_BL)
      logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
      logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
      greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
      return logp_BL, greedy_BL

    _SCORE_FNS[key] = (jax.jit(token_logprobs), counts)
  return _SCORE_FNS[key]


class Scorer:
  """Batched log-likelihoods for one model (LoRA leaves applied unmerged when present).

  `platform` (default: the mesh's, else jax's devices') picks the model's kernels.
  """

  def __init__(self, config: LlamaConfig, params: Any, lora_config: LoraConfig | None,
               tokenizer: Any, *, batch_size: int = 8, add_bos: bool | None = None,
               max_length: int | None = None, mesh: Any = None, platform: str | None = None):
    if lora_config is not None and not has_lora(params):
      lora_config = None
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.batch_size = int(batch_size)
    self.add_bos = resolve_add_bos(tokenizer, add_bos)
    self.max_length = int(max_length or config.max_position_embeddings)
    self._sharding, self._multiple = None, 1
    if mesh is not None:
      from lora_jax.generate import place_on_mesh
      self._sharding, self._multiple, self.params = place_on_mesh(config, params, lora_config,
                                                                  mesh)
    self._fn, self.trace_count = _score_fn(config, lora_config, resolve_platform(platform, mesh),
                                           mesh)

  def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return encode_pair(self.tokenizer, context, continuation, self.add_bos)

  def score(self, requests: Sequence[tuple[str, str]], progress: Any = None) -> list[Score]:
    encoded = [self.encode(c, x) for c, x in requests]
    return self.score_ids(encoded, progress=progress)

  def score_ids(self, encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
                progress: Any = None) -> list[Score]:
    """Scores pre-tokenized (context ids, continuation ids) pairs."""
    rows = []
    for ctx, cont in encoded:
      if not cont:
        raise ValueError("empty continuation: nothing to score")
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Score | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      L = bucket_length(max(len(rows[i][0]) for i in idx))
      B = bucket_batch(len(idx), self.batch_size, self._multiple)
      inputs = np.zeros((B, L), np.int32)
      targets = np.zeros((B, L), np.int32)
      segments = np.zeros((B, L), np.int32)
      for b, i in enumerate(idx):
        x, y, _ = rows[i]
        inputs[b, :len(x)], targets[b, :len(y)], segments[b, :len(x)] = x, y, 1
      logp, greedy = self._fn(self.params, *(self._put(a) for a in (inputs, targets, segments)))
      logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
      for b, i in enumerate(idx):
        n_in, n_cont = len(rows[i][0]), rows[i][2]
        sl = slice(n_in - n_cont, n_in)
        out[i] = Score(float(logp[b, sl].sum()), n_cont, bool(greedy[b, sl].all()))
      if progress is not None:
        progress.update(len(idx))
    return out  # type: ignore[return-value]

  def _put(self, x):
    if self._sharding is not None:
      return jax.device_put(x, self._sharding)
    return jnp.asarray(x)
