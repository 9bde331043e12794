"""Record -> token ids + loss mask: raw text (CPT) and the instruction formats (IFT).

The prompt templates live in `TEMPLATES`, one per format, as data:
  magicoder  {"instruction", "response"}  Magicoder's "@@ Instruction / @@ Response" prompt
  metamath   {"query", "response"}        MetaMathQA's Alpaca-style "### Instruction: / ### Response:"
  chat       {"messages": [{"role", "content"}]}  role headers; every assistant turn is a target
An IFT example becomes segments of (text, is_target); prompt segments get loss_mask 0, each target
segment gets loss_mask 1 and is followed by EOS (also a target), so the model learns to stop.
Prompt and response are tokenized separately (as LLM-Foundry does) so the mask boundary is exact.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lora_jax.data.errors import DataError, describe_type

WHERE = "_where"

MAGICODER_SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently "
                    "delivers accurate and reliable responses to user instructions.")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")

TEMPLATES: dict[str, dict[str, Any]] = {
    "magicoder": {
        "fields": ("instruction", "response"),
        "prompt": MAGICODER_SYSTEM + "\n\n@@ Instruction\n{instruction}\n\n@@ Response\n",
        "response": "{response}",
    },
    "metamath": {
        "fields": ("query", "response"),
        "prompt": ALPACA_PREAMBLE + "\n\n### Instruction:\n{query}\n\n### Response:\n",
        "response": "{response}",
    },
    "chat": {
        "fields": ("messages",),
        # Non-assistant turns are prompt text; an assistant turn is its header (prompt) followed
        # by its content (target) and EOS.
        "turns": {
            "system": "<|system|>\n{content}\n",
            "user": "<|user|>\n{content}\n",
            "assistant": "<|assistant|>\n",
        },
        "response": "{content}",
    },
}
IFT_FORMATS = tuple(TEMPLATES)


def _where(record: dict) -> str:
  return str(record.get(WHERE, "<record>"))


def _keys(record: dict) -> str:
  return ", ".join(sorted(k for k in record if k != WHERE and k != "_error")) or "none"


def detect_format(record: dict, fmt: str = "auto") -> str:
  """`fmt`, or (for "auto") the format whose fields the record has."""
  if fmt != "auto":
    if fmt not in TEMPLATES:
      raise DataError("data.format", f"unknown IFT format {fmt!r}; expected 'auto' or one of "
                      f"{IFT_FORMATS}")
    return fmt
  for name in ("chat", "magicoder", "metamath"):
    if all(f in record for f in TEMPLATES[name]["fields"]):
      return name
  raise DataError(_where(record), "cannot detect the IFT format (data.format='auto'): expected "
                  "fields {instruction, response}, {query, response} or {messages}; record has "
                  f"{_keys(record)}")


def _text(record: dict, field: str, what: str = "field") -> str:
  """A required non-empty string field (bytes are decoded as UTF-8)."""
  if field not in record:
    raise DataError(_where(record), f"missing {what} {field!r} (record has: {_keys(record)})")
  value = record[field]
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      raise DataError(_where(record), f"{what} {field!r} is not valid UTF-8") from None
  if not isinstance(value, str):
    raise DataError(_where(record), f"{what} {field!r} must be a string, got "
                    f"{describe_type(value)}")
  if not value.strip():
    raise DataError(_where(record), f"empty text in {what} {field!r}")
  return value


def _messages(record: dict) -> list[dict]:
  where = _where(record)
  msgs = record.get("messages")
  if isinstance(msgs, dict) and set(msgs) >= {"role", "content"}:  # columnar (TFDS Sequence)
    msgs = [{"role": r, "content": c} for r, c in zip(msgs["role"], msgs["content"])]
  if not isinstance(msgs, list):
    raise DataError(where, f"'messages' must be a list of {{role, content}}, got "
                    f"{describe_type(msgs)}")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict):
      raise DataError(where, f"messages[{i}] must be an object, got {describe_type(m)}")
    role = m.get("role")
    if role not in TEMPLATES["chat"]["turns"]:
      raise DataError(where, f"messages[{i}].role must be one of "
                      f"{tuple(TEMPLATES['chat']['turns'])}, got {role!r}")
    content = m.get("content")
    if role != "assistant" and content == "":  # empty system / user turns occur in real data
      out.append({"role": role, "content": ""})
      continue
    out.append({"role": role, "content": _text({**m, WHERE: where}, "content",
                                               f"messages[{i}]")})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(where, "'messages' has no assistant turn (nothing to train on)")
  return out


def ift_segments(example: dict, fmt: str = "auto") -> list[tuple[str, bool]]:
  """An IFT record -> [(text, is_target)], validated. Raises `DataError` naming the record."""
  fmt = detect_format(example, fmt)
  tpl = TEMPLATES[fmt]
  if fmt == "chat":
    segments = []
    for m in _messages(example):
      if m["role"] == "assistant":
        segments.append((tpl["turns"]["assistant"], False))
        segments.append((tpl["response"].format(content=m["content"]), True))
      else:
        segments.append((tpl["turns"][m["role"]].format(content=m["content"]), False))
    return segments
  values = {f: _text(example, f) for f in tpl["fields"]}
  return [(tpl["prompt"].format(**values), False), (tpl["response"].format(**values), True)]


def format_prompt(example: dict, fmt: str = "auto") -> str:
  """The prompt a model should continue (for generation): the text before the last target."""
  segments = ift_segments(example, fmt)
  last = max(i for i, (_, target) in enumerate(segments) if target)
  return "".join(text for text, _ in segments[:last])


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer, *,
                    add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = ([tokenizer.bos_id], [0]) if add_bos else ([], [])
  for text, target in segments:
    toks = tokenizer.encode(text)
    ids.extend(toks)
    mask.extend([int(target)] * len(toks))
    if target:
      ids.append(tokenizer.eos_id)
      mask.append(1)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def encode_ift_example(example: dict, tokenizer, fmt: str = "auto", *,
                       add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """-> (ids, loss_mask) int32 [T]: [BOS] prompt response EOS, mask 1 on response tokens + EOS."""
  return encode_segments(ift_segments(example, fmt), tokenizer, add_bos=add_bos)


def encode_cpt_example(record: dict, tokenizer, text_field: str = "text", *,
                       add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """-> (ids, loss_mask) int32 [T]: [BOS] text EOS, mask 1 everywhere (every token is a target;
  the packer's segment ids keep the first token of a document from being predicted)."""
  text = _text(record, text_field, "data.text_field")
  ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(text) + [tokenizer.eos_id]
  return np.asarray(ids, np.int32), np.ones(len(ids), np.int32)
