"""Code IFT: Llama-2-7B instruction-finetuned on Magicoder-Evol-Instruct-110K (72.97M tokens).

Paper values (sources in lora_jax/experiments/paper_regimes.py): seq 4096, global batch 192,
samples packed with packing_ratio 3 (the authors' table: 193 steps per epoch, 3088 at 16),
cosine schedule with 10% warmup to 0.01x, decoupled LionW (0.9, 0.95), weight decay 0, clip
1.0; LR full FT 5e-5, LoRA 2e-4 (r=256: 1e-4); 1, 2, 4, 8, 16 epochs; Llama-2-7b-chat-hf
tokenizer.
Also the regularization comparison: full FT with weight decay 5e-5 / 1e-4 or attention dropout
0.05 / 0.1, against LoRA r=16 / 256 (group "regularization"; LoRA runs are in "main").

  lora-jax sweep --config configs/paper/code_ift.py --dry-run --variant rank=256,epochs=4
  lora-jax sweep --config configs/paper/code_ift.py --groups main,regularization --dry-run
"""

from lora_jax.experiments import paper_regimes as common

NAME = "code_ift"
KIND = "ift"
DATA = {
    # Prepared from the HF dataset ise-uiuc/Magicoder-Evol-Instruct-110K (fields instruction,
    # response) as JSON lines under {data_root}/; see launch/prepare_data.py.
    "hf_dataset": "ise-uiuc/Magicoder-Evol-Instruct-110K",
    "source": "jsonl",
    "path": "magicoder-evol-instruct-110k/*.jsonl",
    "format": "magicoder",
}
SEQ_LEN = 4096
GLOBAL_BATCH = 192
LR = {"full": 5e-5, "lora": 2e-4, "lora_r256": 1e-4}
WEIGHT_DECAY = 0.0
EPOCHS = (1, 2, 4, 8, 16)
NUM_SAMPLES = 111_183  # rows of ise-uiuc/Magicoder-Evol-Instruct-110K
PACKING_RATIO = 3.0  # 111,183 samples // (3 x 192) = 193 steps per epoch (authors' table)
CHECKPOINT_EVERY = 200  # steps
LR_SEARCH_BUDGET = {"epochs": 2.0}  # the paper compared optimizers and LRs at 2 epochs
LR_GRID = {"full": (1e-5, 2e-5, 5e-5, 1e-4), "lora": (5e-5, 1e-4, 2e-4, 5e-4)}
REGULARIZERS = ({"wd": 5e-5}, {"wd": 1e-4}, {"attn_dropout": 0.05}, {"attn_dropout": 0.1})
# The paper plots these four full-FT models as single points; our notes do not say at which epoch
# count, so the group lists every count (20 runs); pick some with `--filter 'ep4$'`.

# Evaluated after training with `lora-jax eval --tasks humaneval,forgetting` (eval.tasks); the
# paper's settings are lora-jax eval's defaults (lora_jax.evals.runner.EvalOptions).
EVAL_TASKS = ("humaneval", "forgetting")


def extra_sweep_groups(regime):
  """The regularization comparison: full FT with weight decay or attention dropout."""
  regularization = common.cross(
      [{"method": "full", **r} for r in REGULARIZERS], common.budget_axis(regime))
  return {"regularization": common.variants(regularization)}


(get_config, run_name, get_sweep, branch_of, describe,
 follow_ups) = common.entry_points(globals())
