"""Training metrics: metrics.jsonl, TensorBoard events, a TTY progress bar, FLOPs and MFU.

metrics.jsonl (written by process 0 only) holds one JSON object per line:
  train: {"step", "tokens", "epoch", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s",
          "mfu", "trainable_params", "total_params", "device_memory_bytes"?, "loss_tokens"}
  eval:  {"step", "tokens", "epoch", "eval": {task: {metric: value}}}
Values that are unknown (mfu on CPU, step time of a session's first step, epoch of an unsized
stream) or non-finite (a skipped NaN step's loss) are null.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import jax

from lora_jax import fileio

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device, matched by substring of `device.device_kind` (lower case).
PEAK_FLOPS = (
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12),
    ("l4", 121e12), ("a10g", 125e12), ("v100", 125e12),
)


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
  """`override` if > 0, else the table's value for the device kind; None when unknown (CPU)."""
  if override > 0:
    return float(override)
  device = device or jax.devices()[0]
  kind = str(getattr(device, "device_kind", "")).lower()
  for key, flops in PEAK_FLOPS:
    if key in kind:
      return flops
  return None


def matmul_params(model_config, total_params: int) -> int:
  """Params that take part in matmuls: all but the input embedding (a gather) unless tied."""
  if model_config.tie_word_embeddings:
    return total_params
  return total_params - model_config.vocab_size * model_config.hidden_size


def train_flops_per_token(model_config, total_params: int, trainable_params: int,
                          seq_len: int) -> float:
  """Model FLOPs per trained token (no remat recompute): forward 2N, backward 2N for activation
  gradients plus 2N_trainable for weight gradients (= 6N for full finetuning), plus attention
  12 * layers * heads * head_dim * seq_len (PaLM's convention, causal mask not discounted)."""
  n = matmul_params(model_config, total_params)
  n_tr = min(trainable_params, n)
  attn = 12 * model_config.num_hidden_layers * model_config.num_attention_heads * (
      model_config.dh) * seq_len
  return 4.0 * n + 2.0 * n_tr + attn


def device_memory_bytes() -> int | None:
  """Peak bytes in use on the first local device, when the backend reports it."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without stats raise various errors
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def _rows_up_to(text: str, step: int) -> list[str]:
  """The lines of metrics.jsonl `text` of steps <= `step`, each ending in a newline; a line that
  is not JSON (the torn last line of a crash) is dropped."""
  keep = []
  for ln in (ln for ln in text.splitlines(keepends=True) if ln.strip()):
    try:
      if json.loads(ln).get("step", 0) <= step:
        keep.append(ln if ln.endswith("\n") else ln + "\n")
    except json.JSONDecodeError:
      continue
  return keep


class MetricsWriter:
  """Appends metric records to metrics.jsonl and TensorBoard; a tqdm bar when stdout is a TTY.

  Only process 0 writes (`enabled`). On resume, `truncate_after(step)` drops lines of steps that
  will be re-run, so the file holds each step once.

  On an object store (no append) the rows are kept in memory and `sync()` rewrites the whole
  object, written once and complete; the training loop syncs before each checkpoint save, so the
  object holds every row up to the newest checkpoint, and rows past the checkpoint a resumed run
  restores are dropped by `truncate_after`: none lost, none twice. TensorBoard events are
  written to a local staging dir, uploaded at each sync.
  """

  def __init__(self, output_dir: str, *, enabled: bool = True, tensorboard: bool = True,
               total_steps: int = 0, initial_step: int = 0, progress: bool | None = None):
    self.enabled = enabled
    self.path = fileio.join(output_dir, METRICS_FILE)
    self.remote = fileio.is_remote(output_dir)
    self.history: list[dict] = []
    self._rows: list[str] = []  # remote: the object's lines (local: appended to the file)
    self._dirty = False
    self._tb = self._bar = self._tb_staging = None
    if not enabled:
      return
    fileio.makedirs(output_dir)
    self.truncate_after(initial_step)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb_staging = fileio.Staging(fileio.join(output_dir, "tensorboard"))
      self._tb = SummaryWriter(self._tb_staging.local)
    if progress is None:
      progress = sys.stdout.isatty()
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit="step")

  def truncate_after(self, step: int) -> None:
    if not fileio.exists(self.path):
      return
    text = fileio.read_text(self.path)
    keep = _rows_up_to(text, step)
    if self.remote:
      self._rows = keep
    if len(keep) != len([ln for ln in text.splitlines() if ln.strip()]):
      fileio.atomic_write_text(self.path, "".join(keep))

  def write(self, record: dict[str, Any]) -> None:
    self.history.append(record)
    if not self.enabled:
      return
    line = fileio.dumps(record, nonfinite="null") + "\n"
    if self.remote:
      self._rows.append(line)
      self._dirty = True
    else:
      with open(self.path, "a") as f:
        f.write(line)
        f.flush()
    step = record.get("step", 0)
    if self._tb is not None:
      for k, v in record.items():
        if k == "eval" and isinstance(v, dict):
          for task, ms in v.items():
            for m, x in (ms.items() if isinstance(ms, dict) else [("value", ms)]):
              if isinstance(x, (int, float)):
                self._tb.add_scalar(f"eval/{task}/{m}", x, step)
        elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and (
            math.isfinite(v)):
          self._tb.add_scalar(f"train/{k}", v, step)
      self._tb.flush()
    if self._bar is not None and "loss" in record:
      self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}")

  def sync(self) -> None:
    """On an object store: rewrites metrics.jsonl with every row so far and uploads the
    TensorBoard events (a no-op for local files, which are appended and flushed as written)."""
    if not (self.enabled and self.remote):
      return
    if self._dirty:
      fileio.atomic_write_text(self.path, "".join(self._rows))
      self._dirty = False
    if self._tb is not None:
      self._tb.flush()
      self._tb_staging.upload()

  def advance(self) -> None:
    """One more step on the progress bar."""
    if self._bar is not None:
      self._bar.update(1)

  def close(self) -> None:
    """Closes the bar and TensorBoard; on an object store a last `sync()` (a failure is logged:
    the rows it would add are past the last checkpoint, which a resumed run re-runs)."""
    if self._bar is not None:
      self._bar.close()
    try:
      self.sync()
    except Exception as e:  # noqa: BLE001 - the storage may be what stopped the run
      log.warning("could not write %s: %s: %s", self.path, type(e).__name__, e)
    if self._tb is not None:
      self._tb.close()
    if self._tb_staging is not None:
      self._tb_staging.close()
