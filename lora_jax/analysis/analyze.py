"""Spectral analysis of a (base, finetuned) model pair, streamed module by module.

For each module type (q_proj, ..., down_proj) the layers are processed in batches of same-shaped
matrices: the batch's base and finetuned kernels are read (one tensor at a time from disk for HF
sources), sent to the device, and one vmapped, jitted SVD call returns the spectra of W_base, W_ft
and dW. Host memory therefore holds at most the two models (when given in memory) plus one batch;
device memory holds one batch (`max_batch_bytes` per input stack, at least one matrix).

When the finetuned matrix is W_base + scale * A B (a LoRA adapter, PEFT or lora-jax leaves) the
spectrum of dW comes from the factors (`spectra.factor_svd`), exact and cheap; W_ft is still dense.

    result = analyze(base_params, ft_params, modules=("q_proj", "down_proj"), variance=0.9)
    result.rank_by_layer("delta")   # {"q_proj": [rank@90% per layer], ...}
    save_analysis(result, "out/")   # spectra.npz + analysis.json
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Sequence

import numpy as np

from lora_jax.analysis import intruders as intruders_lib
from lora_jax.analysis import spectra
from lora_jax.analysis.sources import PeftSource, WeightSource, kernel_shape, open_source
from lora_jax.lora import ALL_MODULES, SHORTHANDS, LoraConfig

WHICH = ("base", "ft", "delta")
DEFAULT_MAX_BATCH_BYTES = 256 << 20
EFFECTIVE_RANK_DOC = "exp(entropy of s / sum(s)) (Roy & Vetterli 2007)"


@dataclasses.dataclass
class Analysis:
  """Per-matrix table (`rows`), all singular values (`spectra`) and run metadata (`meta`).

  rows: one dict per (layer, module) with keys layer, module, shape [in, out], delta_from
    ("dense" | "factors"), lora_rank, rank_{base,ft,delta} (rank@variance), erank_{base,ft,delta},
    fro_base, fro_delta, rel_delta_norm, sigma_max_{base,ft,delta} and, with intruders on,
    intruders (count) and intruder_max_cos [k].
  spectra: "{module}.{base|ft|delta}" -> [num analyzed layers, min(in, out)] descending
    (dW of a LoRA module is zero-padded beyond its rank); "{module}.layers" -> layer indices.
  """
  rows: list[dict]
  spectra: dict[str, np.ndarray]
  meta: dict

  @property
  def modules(self) -> list[str]:
    return list(self.meta["modules"])

  def column(self, module: str, key: str) -> tuple[list[int], list[Any]]:
    """(layers, values) of one column of the table for one module type, in layer order."""
    rows = sorted((r for r in self.rows if r["module"] == module), key=lambda r: r["layer"])
    return [r["layer"] for r in rows], [r[key] for r in rows]

  def rank_by_layer(self, which: str = "delta") -> dict[str, tuple[list[int], list[int]]]:
    """{module: (layers, rank@variance of W_`which` per layer)}."""
    return {m: self.column(m, f"rank_{which}") for m in self.modules}

  def summary(self) -> dict[str, dict[str, float]]:
    """Per-module means over layers (ranks, relative norm, intruders when present)."""
    out = {}
    for m in self.modules:
      rows = [r for r in self.rows if r["module"] == m]
      if not rows:
        continue
      s = {"layers": len(rows), "shape": rows[0]["shape"],
           "max_rank": int(min(rows[0]["shape"]))}
      for key in ("rank_base", "rank_ft", "rank_delta", "erank_delta", "rel_delta_norm"):
        vals = np.array([r[key] for r in rows], np.float64)
        s[f"mean_{key}"] = float(vals.mean())
      s["min_rank_delta"] = int(min(r["rank_delta"] for r in rows))
      s["max_rank_delta"] = int(max(r["rank_delta"] for r in rows))
      if "intruders" in rows[0]:
        s["total_intruders"] = int(sum(r["intruders"] for r in rows))
      out[m] = s
    return out


def parse_modules(modules: str | Iterable[str] | None) -> tuple[str, ...]:
  """"q_proj,down_proj" / "attention" / "mlp" / "all" / None -> module names in canonical order."""
  if modules is None:
    return ALL_MODULES
  if isinstance(modules, str):
    modules = [m for m in modules.replace(" ", ",").split(",") if m]
  names = set()
  for m in modules:
    if m not in SHORTHANDS and m not in ALL_MODULES:
      raise ValueError(f"unknown module {m!r}; valid: {list(ALL_MODULES)} or {sorted(SHORTHANDS)}")
    names.update(SHORTHANDS.get(m, (m,)))
  return tuple(m for m in ALL_MODULES if m in names)


def _batches(items: Sequence, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _pad(x_LxMxN: np.ndarray, n: int) -> np.ndarray:
  """Zero-pads the leading axis to n so every batch has one shape (one compile per shape)."""
  if x_LxMxN.shape[0] == n:
    return x_LxMxN
  pad = np.zeros((n - x_LxMxN.shape[0],) + x_LxMxN.shape[1:], x_LxMxN.dtype)
  return np.concatenate([x_LxMxN, pad])


def _load_pair(base: WeightSource, ft: WeightSource, layer: int, module: str):
  """(w_base, w_ft or None, lora (A*scale, B) or None): w_ft None means W_ft = W_base + A B."""
  w_base = base.kernel(layer, module)
  lora = ft.lora(layer, module)
  same_kernel = isinstance(ft, PeftSource) and ft.base is base
  w_ft = w_base if same_kernel else ft.kernel(layer, module)
  if w_ft.shape != w_base.shape:
    raise ValueError(f"layer {layer} {module}: base {w_base.shape} vs finetuned {w_ft.shape}")
  if lora is not None:
    a, b, scale = lora
    a = a * np.float32(scale)
    if same_kernel or np.array_equal(w_ft, w_base):
      return w_base, None, (a, b)
    return w_base, w_ft + a @ b, None  # kernel moved too: dense dW
  return w_base, w_ft, None


def analyze(base: Any, finetuned: Any, *, modules: str | Iterable[str] | None = None,
            layers: Iterable[int] | None = None, variance: float = 0.9, intruders: bool = False,
            intruder_k: int = intruders_lib.DEFAULT_K, intruder_eps: float = intruders_lib.DEFAULT_EPS,
            base_lora: LoraConfig | None = None, finetuned_lora: LoraConfig | None = None,
            max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, layer_batch: int | None = None,
            progress: bool = True) -> Analysis:
  """Spectra and rank statistics of every (layer, module) matrix of `finetuned` against `base`.

  `base` / `finetuned`: params pytrees, WeightSources or paths (HF dir, lora-jax checkpoint; the
  finetuned side may also be a PEFT adapter dir). `finetuned_lora` gives the scale of LoRA leaves
  in an in-memory finetuned pytree. `layer_batch` overrides how many layers share one SVD call
  (default: as many as fit in `max_batch_bytes` of float32 per stack).
  """
  t0 = time.time()
  base_src = open_source(base, lora_config=base_lora, name="base")
  ft_src = open_source(finetuned, base=base_src, lora_config=finetuned_lora, name="finetuned")
  mods = parse_modules(modules)
  all_layers = list(range(base_src.num_layers))
  layer_list = sorted(set(layers)) if layers is not None else all_layers
  bad = [l for l in layer_list if l not in all_layers]
  if bad:
    raise ValueError(f"layers {bad} out of range: the base model has {base_src.num_layers}")
  if ft_src.num_layers != base_src.num_layers:
    raise ValueError(f"base has {base_src.num_layers} layers, finetuned {ft_src.num_layers}")

  rows: list[dict] = []
  spec: dict[str, list] = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(mods) * len(layer_list), desc="analyze", unit="matrix")
  try:
    for module in mods:
      if bar is not None:
        bar.set_postfix_str(module)
      if layer_batch:
        size = layer_batch
      else:
        m, n = kernel_shape(base_src, layer_list[0], module)
        size = max(1, int(max_batch_bytes // (4 * m * n)))
      size = min(size, len(layer_list))
      for chunk in _batches(layer_list, size):
        rows_chunk, spec_chunk = _analyze_chunk(base_src, ft_src, module, chunk, size, variance,
                                                intruders, intruder_k, intruder_eps)
        rows.extend(rows_chunk)
        for which, s in spec_chunk.items():
          spec.setdefault(f"{module}.{which}", []).append(s)
        if bar is not None:
          bar.update(len(chunk))
  finally:
    if bar is not None:
      bar.close()

  spectra_out = {k: np.concatenate(v) for k, v in spec.items()}
  for module in mods:
    spectra_out[f"{module}.layers"] = np.asarray(layer_list, np.int64)
  meta = {"base": base_src.name, "finetuned": ft_src.name, "variance": float(variance),
          "modules": list(mods), "layers": layer_list, "num_layers": base_src.num_layers,
          "effective_rank": EFFECTIVE_RANK_DOC,
          "intruders": ({"k": int(intruder_k), "eps": float(intruder_eps),
                         "space": "output (right singular vectors of Linen [in, out] kernels)"}
                        if intruders else None),
          "seconds": round(time.time() - t0, 3)}
  return Analysis(rows, spectra_out, meta)


def _analyze_chunk(base_src, ft_src, module, chunk, size, variance, intruders, k, eps):
  loaded = [_load_pair(base_src, ft_src, l, module) for l in chunk]
  n = len(chunk)
  w_base = np.stack([x[0] for x in loaded])
  factor_layers = [i for i, x in enumerate(loaded) if x[1] is None]
  # Within a batch every layer goes the same way: factors when all are LoRA with unchanged
  # kernels (and the same rank), dense otherwise.
  ranks = {loaded[i][2][0].shape[1] for i in factor_layers}
  use_factors = len(factor_layers) == n and len(ranks) == 1
  if use_factors:
    a = np.stack([x[2][0] for x in loaded])
    b = np.stack([x[2][1] for x in loaded])
    out = spectra.lora_pair_spectra(_pad(w_base, size), _pad(a, size), _pad(b, size), 1.0)
    w_ft = None
  else:
    w_ft = np.stack([x[1] if x[1] is not None else x[0] + x[2][0] @ x[2][1] for x in loaded])
    out = spectra.pair_spectra(_pad(w_base, size), _pad(w_ft, size))
  out = {key: v[:n] for key, v in out.items()}
  ranks_p = {w: spectra.rank_at_variance(out[w], variance) for w in WHICH}
  eranks = {w: spectra.effective_rank(out[w]) for w in WHICH}
  rel = spectra.relative_norm(out["delta_fro"], out["base_fro"])
  if intruders:
    if w_ft is None:
      w_ft = np.stack([x[0] + x[2][0] @ x[2][1] for x in loaded])
    max_cos, _ = intruders_lib.max_cosine_stacked(_pad(w_base, size), _pad(w_ft, size), k)
    max_cos = max_cos[:n]
  rows = []
  for i, layer in enumerate(chunk):
    lora = loaded[i][2]
    row = {"layer": int(layer), "module": module, "shape": list(w_base.shape[1:]),
           "delta_from": "factors" if use_factors else "dense",
           "lora_rank": int(lora[0].shape[1]) if lora is not None else None}
    for w in WHICH:
      row[f"rank_{w}"] = int(ranks_p[w][i])
      row[f"erank_{w}"] = float(eranks[w][i])
      row[f"sigma_max_{w}"] = float(out[w][i, 0])
    row["fro_base"] = float(out["base_fro"][i])
    row["fro_delta"] = float(out["delta_fro"][i])
    row["rel_delta_norm"] = float(rel[i])
    if intruders:
      row["intruders"] = intruders_lib.count_intruders(max_cos[i], eps)
      row["intruder_max_cos"] = [float(c) for c in max_cos[i]]
    rows.append(row)
  return rows, {w: out[w] for w in WHICH}
