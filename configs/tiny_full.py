"""Full finetuning of the `tiny` preset on the synthetic corpus: ~10 s on one CPU core.

  lora-jax train --config configs/tiny_full.py --config.output_dir=/tmp/tiny_full
"""

from lora_jax.config import default_config


def get_config():
  c = default_config()
  c.output_dir = "runs/tiny_full"
  c.model.preset = "tiny"
  c.lora.enabled = False
  c.optimizer.name = "lionw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "cosine_with_warmup"
  c.schedule.warmup_fraction = 0.1
  c.train.steps = 40
  c.train.global_batch = 8
  c.train.seq_len = 64
  c.train.log_every = 5
  c.train.checkpoint_every = 20
  c.data.source = "synthetic"
  c.data.regime = "cpt"
  c.data.tokenizer = "byte"
  return c
