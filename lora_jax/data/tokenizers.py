"""Tokenizers behind one small interface: byte-level (tests, demo), HF tokenizer.json, SentencePiece.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str`,
`bos_id`, `eos_id`, `pad_id`, `vocab_size` and `add_bos`: whether the tokenizer itself prepends
BOS when asked for special tokens (HF's `tokenizer(text)`), read from `tokenizer_config.json`'s
`add_bos_token` when the directory has one, else from tokenizer.json's post-processor (a BOS in
its single-sequence template); a bare SentencePiece model follows HF's LlamaTokenizer (True).
`load_tokenizer(spec)` takes "byte", a `tokenizer.json` path, a SentencePiece `.model` path, or a
directory holding either; paths may be local or gs:// (a remote file is parsed from a local copy).
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

from lora_jax import fileio


class Tokenizer(Protocol):
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int
  add_bos: bool

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted by 3: 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3 (vocab 259)."""
  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + 3
  add_bos = True
  name = "byte"

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers` tokenizer.json (e.g. Llama-3, or Llama-2 converted by transformers)."""

  def __init__(self, path: str, bos: str | None = None, eos: str | None = None):
    from tokenizers import Tokenizer as _Tok
    self.name = path
    try:
      with fileio.local_copy(path) as local:  # gs://: read once from a staged copy
        self._tok = _Tok.from_file(local)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    cfg = _special_tokens_from_dir(os.path.dirname(path))
    self.bos_id = self._id(bos or cfg.get("bos_token"), ("<s>", "<|begin_of_text|>"), 1)
    self.eos_id = self._id(eos or cfg.get("eos_token"),
                           ("</s>", "<|end_of_text|>", "<|endoftext|>"), 2)
    pad = self._id(cfg.get("pad_token"), ("<pad>", "<unk>"), None)
    self.pad_id = self.eos_id if pad is None else pad
    self.add_bos = cfg.get("add_bos_token", self._post_processor_adds(self.bos_id))

  def _post_processor_adds(self, token_id: int) -> bool:
    """Whether encoding with special tokens puts `token_id` first (TemplateProcessing, or any)."""
    ids = self._tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == token_id and self._tok.encode(
        "a", add_special_tokens=False).ids[:1] != [token_id]

  def _id(self, token, candidates, default):
    for t in ([token] if token else []) + list(candidates):
      i = self._tok.token_to_id(t)
      if i is not None:
        return i
    return default

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
  """A SentencePiece `.model` (Llama-2's tokenizer.model)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.name = path
    self._sp = spm.SentencePieceProcessor()
    try:
      with fileio.local_copy(path) as local:
        self._sp.Load(local)
    except Exception as e:
      raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from e
    self.vocab_size = self._sp.GetPieceSize()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else 1
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else 2
    pad = self._sp.pad_id()
    self.pad_id = pad if pad >= 0 else self.eos_id
    self.add_bos = _special_tokens_from_dir(os.path.dirname(path)).get("add_bos_token", True)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])


def _special_tokens_from_dir(d: str) -> dict:
  out = {}
  p = fileio.join(d, "tokenizer_config.json") if d else ""
  if p and fileio.exists(p):
    cfg = fileio.read_json(p, "tokenizer config")
    for k in ("bos_token", "eos_token", "pad_token"):
      v = cfg.get(k)
      out[k] = v.get("content") if isinstance(v, dict) else v
    if isinstance(cfg.get("add_bos_token"), bool):
      out["add_bos_token"] = cfg["add_bos_token"]
  return out


def load_tokenizer(spec: str) -> Tokenizer:
  """"byte", a tokenizer.json, a SentencePiece .model, or a directory containing one of them."""
  if spec in ("byte", "", None):
    return ByteTokenizer()
  if fileio.isdir(spec):
    for name in ("tokenizer.json", "tokenizer.model"):
      if fileio.exists(fileio.join(spec, name)):
        return load_tokenizer(fileio.join(spec, name))
    raise FileNotFoundError(f"{spec}: directory has no tokenizer.json or tokenizer.model")
  if not fileio.exists(spec):
    raise FileNotFoundError(f"tokenizer {spec!r}: no such file (expected 'byte', a "
                            "tokenizer.json, a SentencePiece .model, or a directory with one)")
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  return SentencePieceTokenizer(spec)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str = "data.tokenizer"):
  """Error if the tokenizer can emit ids the model has no embedding for."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"{where}: tokenizer {getattr(tokenizer, 'name', '?')!r} has vocab "
                     f"{tokenizer.vocab_size} > model vocab_size {model_vocab_size}")
