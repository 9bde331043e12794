"""Shared by the interop tests: a tiny random transformers Llama (GQA, byte-tokenizer vocab).

Callers skip when torch/transformers are absent (`pytest.importorskip` here), so the helper is
safe to call from any `@pytest.mark.interop` test.
"""

from __future__ import annotations

import pytest


def tiny_hf_llama(path, seed: int = 0, **config):
  """A random `LlamaForCausalLM` saved to `path`; `config` overrides the LlamaConfig fields."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
  fields.update(config)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
  model.save_pretrained(str(path))
  return model
