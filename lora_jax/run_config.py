"""The full schema of a lora-jax training run, with defaults. Every file in configs/ starts here:

    from lora_jax.run_config import default_config
    def get_config():
      c = default_config()
      c.lora.rank = 64
      return c

Use: `lora-jax train --config configs/tiny_lora.py --config.optimizer.lr=3e-4`.
Keys not present here are rejected (the ConfigDict is locked), naming the key.
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.output_dir = "runs/default"

  # Model: a preset name from lora_jax.config.PRESETS, or an HF directory (config.json +
  # safetensors) in `hf_path` (the preset is then ignored). `overrides` patch LlamaConfig fields.
  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"
  c.model.hf_path = ""
  c.model.overrides = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.attention_dropout = 0.0

  # LoRA: `lora.enabled=False` is full finetuning.
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 32.0  # the paper uses alpha = 2 * rank
  c.lora.dropout = 0.05
  c.lora.targets = "all"  # "attention", "mlp", "all" or "q_proj,v_proj,..."
  c.lora.use_rslora = False
  c.lora.init = "default"
  # Full finetuning only: regexes of "/"-joined param paths to keep frozen (e.g. "embed_tokens").
  c.full_ft_frozen = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "lionw"  # "adamw" or "lionw" (decoupled LionW, as Composer)
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 disables

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine_with_warmup"  # or "inv_sqrt_with_warmup", "constant"
  c.schedule.warmup_steps = 0  # used when warmup_fraction is 0
  c.schedule.warmup_fraction = 0.1
  c.schedule.alpha_f = 0.01  # final LR factor (cosine)
  c.schedule.cooldown_fraction = 0.2  # linear cooldown at the end (inv_sqrt)

  # Length of training: the first non-zero of steps, epochs, token_budget decides.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 0
  c.train.epochs = 0.0
  c.train.token_budget = 0
  c.train.global_batch = 8  # sequences per optimizer step, across all devices and hosts
  c.train.microbatches = 1  # gradient accumulation
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 0  # 0: never
  c.train.checkpoint_every = 0  # 0: only at the end
  c.train.keep_checkpoints = 3
  c.train.export = True  # PEFT adapter (LoRA) or HF dir (full) at the end
  c.train.max_bad_steps = 0  # NaN/Inf steps to skip before stopping (0: stop at the first)

  # Mesh: axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.distributed = False  # jax.distributed.initialize() (auto-detected on TPU VMs)

  c.data = ml_collections.ConfigDict()
  c.data.regime = "cpt"  # "cpt" (packed raw text) or "ift" (prompt/response, loss on response)
  c.data.source = "synthetic"  # "synthetic", "jsonl", "parquet", "arrayrecord", "tfds"
  c.data.path = ""  # file, glob or TFDS name (e.g. "huggingface:..." builders)
  c.data.split = "train"
  c.data.text_field = "text"
  c.data.format = "auto"  # IFT: "magicoder", "metamath", "chat" or "auto"
  c.data.tokenizer = "byte"  # "byte", a tokenizer.json path, or a SentencePiece .model path
  c.data.pack = True  # IFT: pack samples (True) or pad each to seq_len (False)
  c.data.skip_malformed = False  # count and skip bad rows instead of failing
  c.data.shuffle = True
  c.data.num_workers = 0
  c.data.synthetic_docs = 512  # documents in the generated corpus (source="synthetic")

  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ""  # e.g. "gsm8k,forgetting"; run every train.eval_every steps
  c.eval.data_dir = ""
  c.eval.limit = 0
  return c
