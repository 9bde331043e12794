"""IFT formats: templates, auto-detection, and a loss mask that covers exactly the responses."""

import json
import pathlib

import numpy as np
import pytest

from lora_jax.data import DataError, TEMPLATES, encode_cpt_example, encode_ift_example, format_prompt
from lora_jax.data.formats import detect_format
from lora_jax.data.tokenizers import ByteTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
TOK = ByteTokenizer()


def _rows(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _spans(mask):
  """[(start, end)] of the runs of 1s."""
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("fmt,name,prompt_field", [("magicoder", "magicoder.jsonl", "instruction"),
                                                   ("metamath", "metamath.jsonl", "query")])
def test_single_turn_mask_covers_exactly_response_and_eos(fmt, name, prompt_field):
  for row in _rows(name):
    ids, mask = encode_ift_example(row, TOK, "auto")
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and mask[0] == 0
    (start, end), = _spans(mask)
    assert end == len(ids), "the response (and EOS) ends the sample"
    assert TOK.decode(ids[start:end - 1]) == row["response"]
    prompt = TOK.decode(ids[1:start])
    assert prompt == TEMPLATES[fmt]["prompt"].format(**row) == format_prompt(row)
    assert row[prompt_field] in prompt and row["response"] not in prompt


def test_template_markers():
  mc = {"instruction": "Do X.", "response": "Done."}
  mm = {"query": "What is 1+1?", "response": "2"}
  assert format_prompt(mc).endswith("@@ Instruction\nDo X.\n\n@@ Response\n")
  assert format_prompt(mm).startswith("Below is an instruction that describes a task.")
  assert format_prompt(mm).endswith("### Instruction:\nWhat is 1+1?\n\n### Response:\n")


def test_chat_multi_turn_loss_on_every_assistant_turn_only():
  rows = _rows("chat.jsonl")
  for row in rows:
    ids, mask = encode_ift_example(row, TOK, "chat")
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    spans = _spans(mask)
    assert len(spans) == len(answers)
    for (s, e), answer in zip(spans, answers):
      assert TOK.decode(ids[s:e - 1]) == answer and ids[e - 1] == TOK.eos_id
      assert TOK.decode(ids[s - len("<|assistant|>\n"):s]) == "<|assistant|>\n"
    prompt_text = TOK.decode(ids[mask == 0])
    for m in row["messages"]:
      if m["role"] != "assistant":
        assert m["content"] in prompt_text
  two_turn = rows[1]
  assert format_prompt(two_turn).endswith("<|user|>\nAnd of Italy?\n<|assistant|>\n")
  assert "Paris." in format_prompt(two_turn) and "Rome." not in format_prompt(two_turn)


def test_add_bos_false_and_cpt_encoding():
  ids, mask = encode_ift_example({"query": "q", "response": "r"}, TOK, add_bos=False)
  assert ids[0] != TOK.bos_id and mask.sum() == 2
  ids, mask = encode_cpt_example({"text": "héllo"}, TOK)
  assert ids.tolist() == [TOK.bos_id] + TOK.encode("héllo") + [TOK.eos_id]
  assert mask.tolist() == [1] * len(ids)
  ids, _ = encode_cpt_example({"body": "x"}, TOK, "body", add_bos=False)
  assert ids.tolist() == TOK.encode("x") + [TOK.eos_id]


def test_auto_detection_and_explicit_format():
  assert detect_format({"messages": []}) == "chat"
  assert detect_format({"instruction": "a", "response": "b"}) == "magicoder"
  assert detect_format({"query": "a", "response": "b", "type": "x"}) == "metamath"
  assert detect_format({"anything": 1}, "metamath") == "metamath"
  with pytest.raises(DataError, match="data.format: unknown IFT format 'alpaca'"):
    detect_format({}, "alpaca")


@pytest.mark.parametrize("record,fmt,match", [
    ({"instruction": "a", "_where": "f.jsonl:7"}, "auto", r"f.jsonl:7: cannot detect"),
    ({"instruction": "a", "_where": "f.jsonl:7"}, "magicoder", r"f.jsonl:7: missing field 'response'"),
    ({"query": 3, "response": "r", "_where": "f:2"}, "metamath", r"f:2: field 'query' must be a string, got int"),
    ({"query": "q", "response": " \n", "_where": "f:2"}, "metamath", r"f:2: empty text in field 'response'"),
    ({"messages": "hi", "_where": "c:4"}, "chat", r"c:4: 'messages' must be a list"),
    ({"messages": [{"role": "user", "content": "x"}], "_where": "c:5"}, "chat", r"c:5: .*no assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}], "_where": "c:6"}, "chat", r"c:6: messages\[0\].role"),
    ({"messages": [{"role": "assistant", "content": None}], "_where": "c:7"}, "chat",
     r"c:7: messages\[0\] 'content' must be a string, got null"),
])
def test_malformed_ift_records_name_their_location(record, fmt, match):
  with pytest.raises(DataError, match=match):
    encode_ift_example(record, TOK, fmt)


def test_malformed_cpt_records_name_their_location():
  with pytest.raises(DataError, match=r"a.jsonl:3: missing data.text_field 'text'"):
    encode_cpt_example({"body": "x", "_where": "a.jsonl:3"}, TOK)
  with pytest.raises(DataError, match=r"a.jsonl:4: empty text in data.text_field 'text'"):
    encode_cpt_example({"text": "", "_where": "a.jsonl:4"}, TOK)
