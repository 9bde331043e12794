"""`LlamaConfig`: the model's hyperparameters, with HF `config.json` conversion and presets.

Field names follow HF `LlamaConfig` so `from_hf` / `to_hf` are near-identity maps.
One-letter dimension names used in shape suffixes across lora-jax:

  B batch, L sequence (query) length, S key/value length, D hidden size (embed),
  H query heads, K key/value heads, Dh head dim, F MLP hidden size, V vocab, R LoRA rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ROPE_TYPES = ("default", "linear", "llama3")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings")
# nothing_saveable: keep only each layer's input (least memory, one extra forward);
# dots_with_no_batch_dims_saveable: also keep the projections' outputs (recompute attention and
# elementwise ops only); dots_saveable: keep every matmul output, attention's too.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # None, or {"rope_type": "linear", "factor": f} or
  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  #  "original_max_position_embeddings"} (HF keys).
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  # Numerics and memory (not part of HF config.json).
  dtype: str = "float32"  # compute dtype, e.g. "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False  # rematerialize each decoder layer in the backward pass
  # What remat keeps from the forward pass: a jax.checkpoint_policies name (see REMAT_POLICIES).
  remat_policy: str = "nothing_saveable"
  attention_impl: str | None = None  # None (per platform, lora_jax.ops), "xla", "cudnn", "splash"
  attention_dropout: float = 0.0  # dropout on attention probabilities (training only)

  def __post_init__(self):
    self._check_types()
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}; set head_dim")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; use one of {REMAT_POLICIES}")
    if self.rope_scaling is not None:
      rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
      if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; "
                         f"use one of {_ROPE_TYPES}")

  def _check_types(self):
    """Each size a positive int and each float a number, so a bad `config.json` value (e.g.
    `"hidden_size": "64"` or `"num_hidden_layers": -1`) is reported by its own key."""
    for key in _POSITIVE_INTS:
      value = getattr(self, key)
      if value is None and key == "head_dim":
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    for key in ("bos_token_id", "eos_token_id"):  # None: the model has no such token
      value = getattr(self, key)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 0):
        raise ValueError(f"{key}: expected a token id (an integer >= 0), got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}: expected a positive number, got {value!r}")
    if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
      raise ValueError(f"attention_dropout: expected a number in [0, 1), got "
                       f"{self.attention_dropout!r}")

  @property
  def dh(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def replace(self, **kwargs) -> "LlamaConfig":
    return dataclasses.replace(self, **kwargs)

  # ---------------------------------------------------------------- HF interop
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from an HF `config.json` dict (old `rope_scaling` or new `rope_parameters`)."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"HF config is missing required keys: {missing}")
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5
      rope_theta = params.get("rope_theta", rope_theta)
      if params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if rope_scaling is not None:
      rope_scaling = dict(rope_scaling)
      if "type" in rope_scaling and "rope_type" not in rope_scaling:
        rope_scaling["rope_type"] = rope_scaling.pop("type")
      if rope_scaling.get("rope_type", "default") == "default":
        rope_scaling = None
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
        eos_token_id=_first(hf.get("eos_token_id", 2)),
    )
    sizes = (kwargs["hidden_size"], kwargs["num_attention_heads"])
    if (all(type(x) is int and x > 0 for x in sizes)  # else __post_init__ names the bad key
        and kwargs["head_dim"] == sizes[0] // sizes[1]):
      kwargs["head_dim"] = None
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """An HF `config.json` dict for `LlamaForCausalLM`."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.dh,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "torch_dtype": self.param_dtype,
    }
    return hf


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


PRESETS: dict[str, LlamaConfig] = {
    # Small enough for unit tests on one CPU core: GQA (4 query heads, 2 kv heads); the vocab
    # covers the byte tokenizer (259 ids).
    "tiny": LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, rms_norm_eps=1e-5),
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                             max_position_embeddings=4096),
    "llama3_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=8192, bos_token_id=128000,
                             eos_token_id=128001),
    # The performance reference of benchmarks/ ("bench-34M").
    "bench_34m": LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=2048),
}


def preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
