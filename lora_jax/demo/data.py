"""In-memory IFT batches of demo `Example`s for `lora_jax.training.train(data_iter=...)`.

Each example is encoded as the data pipeline encodes an IFT sample, without a prompt template:
BOS + prompt (loss_mask 0) + response + EOS (loss_mask 1). Every epoch is a fresh permutation
(seeded by (seed, epoch)), packed whole into rows of `seq_len` with `data.packing.pack_documents`
(mode "whole", so predictions never cross samples) and cut into batches of `batch_size` rows
(the remainder is dropped). The state is {"epoch", "batch"}: restoring it continues exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lora_jax.data.packing import ROW_KEYS, pack_documents
from lora_jax.demo.domains import Example


def encode_example(ex: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
  prompt = [int(tokenizer.bos_id)] + list(tokenizer.encode(ex.prompt))
  response = list(tokenizer.encode(ex.response)) + [int(tokenizer.eos_id)]
  return prompt + response, [0] * len(prompt) + [1] * len(response)


class ExampleBatches:
  """Endless, checkpointable batches (int32 [B, L]: tokens, positions, segment_ids, loss_mask)."""

  def __init__(self, examples: Sequence[Example], tokenizer: Any, *, seq_len: int,
               batch_size: int, seed: int, cache: dict | None = None):
    """`cache` (a dict the caller keeps) shares the encoded samples and packed epochs between
    iterators over the same (examples, seq_len, seed): the demo's finetuning runs all read the
    same batches, so each epoch is packed once instead of once per run."""
    if not examples:
      raise ValueError("no examples")
    self._cache = cache
    if cache is not None and "docs" in cache:
      self._docs = cache["docs"]
    else:
      self._docs = [encode_example(ex, tokenizer) for ex in examples]
      if cache is not None:
        cache["docs"] = self._docs
    longest = max(len(ids) for ids, _ in self._docs)
    if longest > seq_len:
      raise ValueError(f"an example has {longest} tokens > seq_len={seq_len}")
    self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
    self.pad_id = int(tokenizer.pad_id)
    self._epoch, self._batch = 0, 0
    self._rows = self._pack(0)
    if len(self._rows["tokens"]) < self.batch_size:
      raise ValueError(f"one epoch packs into {len(self._rows['tokens'])} rows, fewer than one "
                       f"batch of {self.batch_size}")

  def _pack(self, epoch: int) -> dict[str, np.ndarray]:
    if self._cache is not None and ("epoch", epoch) in self._cache:
      return self._cache[("epoch", epoch)]
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self._docs))
    rows = pack_documents([self._docs[i][0] for i in order], self.seq_len,
                          mask_lists=[self._docs[i][1] for i in order], pad_id=self.pad_id,
                          mode="whole")
    if self._cache is not None:
      for v in rows.values():
        v.setflags(write=False)  # shared between iterators: read-only
      self._cache[("epoch", epoch)] = rows
    return rows

  @property
  def batches_per_epoch(self) -> int:
    return len(self._rows["tokens"]) // self.batch_size

  @property
  def tokens_per_epoch(self) -> int:
    return int(sum(len(ids) for ids, _ in self._docs))

  def __iter__(self) -> "ExampleBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
      self._rows = self._pack(self._epoch)
    sl = slice(self._batch * self.batch_size, (self._batch + 1) * self.batch_size)
    self._batch += 1
    return {k: self._rows[k][sl] for k in ROW_KEYS}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "batch": self._batch}

  def set_state(self, state: dict) -> None:
    epoch = int(state["epoch"])
    if epoch != self._epoch:
      self._rows = self._pack(epoch)
    self._epoch, self._batch = epoch, int(state["batch"])
