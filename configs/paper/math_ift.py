"""Math IFT: Llama-2-7B instruction-finetuned on MetaMathQA (395K samples, ~103M tokens).

Paper values: seq 1024, global batch 768, cosine schedule with 10% warmup to 0.01x, decoupled
LionW (0.9, 0.95), clip 1.0; LR full FT 1e-5, LoRA 1e-4 (r=256: 5e-5); 1, 2, 4, 8, 16 epochs.

  lora-jax sweep --config configs/paper/math_ift.py --dry-run --variant method=full,epochs=2
  lora-jax sweep --config configs/paper/math_ift.py --dry-run
"""

from lora_jax.experiments import paper_regimes as common

NAME = "math_ift"
KIND = "ift"
DATA = {
    # Prepared from the HF dataset meta-math/MetaMathQA (MetaMathQA-395K.json: fields query,
    # response) as JSON lines under {data_root}/; see launch/prepare_data.py.
    "hf_dataset": "meta-math/MetaMathQA",
    "source": "jsonl",
    "path": "metamathqa/*.jsonl",
    "format": "metamath",
}
SEQ_LEN = 1024
GLOBAL_BATCH = 768
LR = {"full": 1e-5, "lora": 1e-4, "lora_r256": 5e-5}
EPOCHS = (1, 2, 4, 8, 16)
CHECKPOINT_EVERY = 200  # steps; ~515 steps per epoch (395K samples / 768)
LR_SEARCH_BUDGET = {"epochs": 2.0}
LR_GRID = {"full": (5e-6, 1e-5, 2e-5, 5e-5), "lora": (2e-5, 5e-5, 1e-4, 2e-4)}

# Evaluated after training with `lora-jax eval --tasks gsm8k,forgetting` (eval.tasks); the
# paper's settings are lora-jax eval's defaults (lora_jax.evals.runner.EvalOptions).
EVAL_TASKS = ("gsm8k", "forgetting")


get_config, run_name, get_sweep = common.entry_points(globals())
