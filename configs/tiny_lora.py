"""LoRA (r=8, all modules) on the `tiny` preset with the synthetic corpus: ~10 s on one CPU core.

  lora-jax train --config configs/tiny_lora.py --config.output_dir=/tmp/tiny_lora
"""

from lora_jax.config import default_config


def get_config():
  c = default_config()
  c.output_dir = "runs/tiny_lora"
  c.model.preset = "tiny"
  c.lora.enabled = True
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = "all"
  c.optimizer.name = "lionw"
  c.optimizer.lr = 3e-3  # a random tiny base needs a large LR to move visibly in 40 steps
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
