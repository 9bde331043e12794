"""Training: `train(cfg)` runs (or resumes) a LoRA / full-finetuning run from a run config.

  step.py        TrainState, the masked next-token loss and the jitted train step
  setup.py       `Trainer` (model, mesh, shardings, optimizer, state), the run's data and length
  loop.py        `train()`: the step loop with metrics, evals, checkpoints, SIGTERM and NaN policy
  evaluation.py  the eval function built from eval.*, and the best-checkpoint metric
  resume.py      output_dir checks, resume from the newest readable checkpoint, base fingerprint
  export.py      exports (PEFT adapter / HF dir / native) and `restore_run` of a checkpoint
  errors.py      `TrainingError`, `EXIT_PREEMPTED`
"""

from lora_jax.training.errors import EXIT_PREEMPTED, TrainingError
from lora_jax.training.export import export, restore_run
from lora_jax.training.loop import TrainResult, train
from lora_jax.training.setup import Trainer
from lora_jax.training.step import TrainState, make_train_step

__all__ = ["train", "TrainResult", "TrainingError", "EXIT_PREEMPTED", "Trainer", "TrainState",
           "make_train_step", "restore_run", "export"]
