"""Code CPT: Llama-2-7B continued-pretrained on StarCoder-Python (up to 20B tokens).

Paper values (sources in lora_jax/experiments/paper_regimes.py): seq 4096, global batch 192
(786,432 tokens per step); LLM-Foundry inv_sqrt_with_warmup with t_warmup = t_scale = 1000
batches, alpha_f_decay = 1 (flat after warmup), a linear cooldown to 0 over the last 20% (5086
of the 20B run's 25,432 batches); decoupled LionW (0.9, 0.95), weight decay 1e-6, clip 1.0; LR
full FT 1e-5, LoRA 1e-5. Budgets 0.25, 0.5, 1, 2, 4, 8, 16, 20B tokens (common.CPT_BUDGETS),
each after its own cooldown: the 20B trunk, and a branch per smaller budget retrained from the
trunk's checkpoint at 0.8 T (`lora-jax sweep` seeds it; full-FT runs are then analyzed, Fig. 6).
With 1000 warmup batches the 0.25B (318 steps) and 0.5B (636 steps) budgets end inside the
warmup, so their cooldown never starts (the scheduler stays in warmup while t < t_warmup), as in
LLM-Foundry.

  lora-jax sweep --config configs/paper/code_cpt.py --dry-run --variant method=lora,rank=256
  lora-jax sweep --config configs/paper/code_cpt.py --dry-run
"""

from lora_jax.experiments import paper_regimes as common

NAME = "code_cpt"
KIND = "cpt"
DATA = {
    # Prepared from the HF dataset bigcode/starcoderdata, data_dir python (gated: accept its
    # terms), as parquet shards under {data_root}/ (text field "content"); see
    # launch/prepare_data.py.
    "hf_dataset": "bigcode/starcoderdata:python",
    "source": "parquet",
    "path": "starcoder-python/*.parquet",
    "text_field": "content",
}
SEQ_LEN = 4096
GLOBAL_BATCH = 192
LR = {"full": 1e-5, "lora": 1e-5}
WEIGHT_DECAY = 1e-6  # Composer decoupled; code CPT only
TOKEN_BUDGET = 20e9  # the trunk; budgets and schedule: common.CPT_BUDGETS, common.CPT_SCHEDULE
CHECKPOINT_EVERY = 500  # steps, for resuming (~1 h on a v5p-64); 25,432 steps in all
LR_SEARCH_BUDGET = {"tokens": 2e9}  # our choice: LR search at 2B tokens
LR_GRID = {"full": (5e-6, 1e-5, 2e-5, 5e-5), "lora": (1e-5, 2e-5, 5e-5, 1e-4)}

# Evaluated after training with `lora-jax eval --tasks humaneval,forgetting` (eval.tasks); the
# paper's settings are lora-jax eval's defaults (lora_jax.evals.runner.EvalOptions).
EVAL_TASKS = ("humaneval", "forgetting")


(get_config, run_name, get_sweep, branch_of, describe,
 follow_ups) = common.entry_points(globals())
