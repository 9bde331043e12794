"""A trained run's weights out of the run: `export` writes them in the interop formats at the end
of training; `restore_run` reopens any training checkpoint of an output_dir.

Export kinds under output_dir/export/: `adapter/` (PEFT, LoRA runs), `hf/` (HF dir; LoRA merged),
`native/` (lora-jax checkpoint: the full params with the LoRA leaves).
"""

from __future__ import annotations

from typing import Any

import jax

from lora_jax import checkpoint as ckpt
from lora_jax import config as rc
from lora_jax import fileio
from lora_jax import sharding
from lora_jax.config import LlamaConfig
from lora_jax.lora import combine_params
from lora_jax.training.resume import check_base
from lora_jax.training.setup import Trainer


def _kinds(mode: str, trainer: Trainer) -> list[str]:
  """The kinds train.export=`mode` writes for this run."""
  lora = trainer.lora_config
  if mode == "auto":
    kinds = ["hf"] if lora is None or lora.init == "pissa" else ["adapter"]
    if lora is not None and not trainer.cfg.model.hf_path:
      kinds.append("native")  # the adapter's base (a preset init) exists nowhere on disk
    return kinds
  if mode == "all":
    return ["hf", "native"] if lora is None else ["adapter", "hf", "native"]
  if mode in ("adapter", "hf", "native"):
    if mode == "adapter" and lora is None:
      raise rc.ConfigError("train.export", "'adapter' needs a LoRA run (lora.enabled=True)")
    return [mode]
  return []


def export(trainer: Trainer, output_dir: str, mode: str) -> dict[str, str]:
  """Writes export/adapter (PEFT, LoRA) and/or export/hf (HF dir; LoRA merged) and/or
  export/native per `mode` (train.export); returns {kind: path}."""
  lora = trainer.lora_config
  kinds = _kinds(mode, trainer)
  out: dict[str, str] = {}
  root = fileio.join(output_dir, "export")
  base_name = trainer.cfg.model.hf_path or trainer.cfg.model.preset
  if "adapter" in kinds:
    from lora_jax.interop.peft import save_peft
    host = sharding.gather_to_host(trainer.state.trainable)
    tree = combine_params(host, trainer.frozen_shapes)  # kernels only need their shapes
    path = fileio.join(root, "adapter")
    if jax.process_index() == 0:
      save_peft(path, trainer.model_config, lora, tree, base_model_name_or_path=base_name)
    out["adapter"] = path
  if "hf" in kinds:
    from lora_jax.interop.hf import save_hf
    host = sharding.gather_to_host(trainer.params())
    path = fileio.join(root, "hf")
    if jax.process_index() == 0:
      save_hf(path, trainer.model_config, host, lora_config=lora)
    out["hf"] = path
    del host
  if "native" in kinds:
    from lora_jax.interop.native import save_checkpoint
    host = sharding.gather_to_host(trainer.params())
    path = fileio.join(root, "native")
    if jax.process_index() == 0:
      step = int(jax.device_get(trainer.state.step))
      save_checkpoint(path, trainer.model_config, host, lora, metadata={
          "step": step, "tokens": step * trainer.cfg.train.global_batch * trainer.cfg.train.seq_len,
          "base": trainer.base_provenance, "run": fileio.abspath(output_dir)})
    out["native"] = path
    del host
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lora_jax_export")
  return out


def restore_run(output_dir: str, step: int | None = None, *, base_params: Any = None,
                force: bool = False) -> tuple[LlamaConfig, Any, dict, dict]:
  """(model_config, lora_config, params, meta) of a training checkpoint in `output_dir` (the
  latest, or `step`): the frozen base is rebuilt from the run's provenance (preset init, HF dir
  or `base_params`) and checked against the saved fingerprint. Loads on the current devices
  whatever mesh the run used."""
  cfg = rc.from_dict(fileio.read_json(fileio.join(output_dir, ckpt.CONFIG_FILE), "run config"))
  trainer = Trainer(cfg, total_steps=1, mesh=sharding.make_mesh(None))
  manager = ckpt.make_manager(output_dir, keep=max(cfg.train.keep_checkpoints, 1),
                              async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{output_dir}: no checkpoint {'' if step is None else step} "
                              f"(have {sorted(manager.all_steps())})")
    trainer.init_state(base_params, with_state=False)
    state, _, meta = ckpt.restore(manager, step, trainer.abstract_state)
  finally:
    manager.close()
  check_base(meta, trainer.base_provenance, step, output_dir, force)
  trainer.state = state
  return trainer.model_config, trainer.lora_config, trainer.params(), meta
