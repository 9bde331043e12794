"""Reading and writing analysis results: `spectra.npz` + `analysis.json`, written atomically."""

from __future__ import annotations

import io

import numpy as np

from lora_jax import fileio
from lora_jax.analysis.analyze import Analysis
from lora_jax.fileio import atomic_write_bytes, atomic_write_json

SPECTRA_FILE = "spectra.npz"
ANALYSIS_FILE = "analysis.json"


def save_analysis(analysis: Analysis, out_dir: str, extra: dict | None = None) -> dict[str, str]:
  """Writes `spectra.npz` (all singular values) and `analysis.json` (meta, summary, per-matrix
  rows) into `out_dir` (a local directory or gs://...); returns their paths."""
  fileio.makedirs(out_dir)
  buf = io.BytesIO()
  np.savez_compressed(buf, **analysis.spectra)
  paths = {"spectra": fileio.join(out_dir, SPECTRA_FILE),
           "analysis": fileio.join(out_dir, ANALYSIS_FILE)}
  atomic_write_bytes(paths["spectra"], buf.getvalue())
  doc = {"meta": analysis.meta, "summary": analysis.summary(), "rows": analysis.rows}
  if extra:
    doc.update(extra)
  # strict JSON, keeping the sign of an infinite norm ratio
  atomic_write_json(paths["analysis"], doc, indent=1, nonfinite="strict")
  return paths


def load_analysis(path: str) -> Analysis:
  """Reads a directory written by `save_analysis` (spectra are optional)."""
  doc = fileio.read_json(fileio.join(path, ANALYSIS_FILE), "analysis")
  spec_path = fileio.join(path, SPECTRA_FILE)
  spectra = {}
  if fileio.exists(spec_path):
    with np.load(io.BytesIO(fileio.read_bytes(spec_path))) as z:
      spectra = {k: z[k] for k in z.files}
  meta = dict(doc["meta"])
  for k, v in doc.items():
    if k not in ("meta", "summary", "rows"):
      meta.setdefault(k, v)
  return Analysis(doc["rows"], spectra, meta)
