"""Kept for one release: the training API moved to `lora_jax.training`; import from there.

`load_run` is `lora_jax.training.restore_run` (renamed: `lora_jax.report.load_run` reads a run
directory's metrics, this one reopens a checkpoint's params).
"""

from lora_jax.config import model_config_from
from lora_jax.training import (EXIT_PREEMPTED, Trainer, TrainingError, TrainResult, TrainState,
                               export, make_train_step, restore_run, train)

load_run = restore_run

__all__ = ["train", "Trainer", "TrainResult", "TrainingError", "EXIT_PREEMPTED",
           "make_train_step", "TrainState", "model_config_from", "load_run", "export"]
