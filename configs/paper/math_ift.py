"""Math IFT: Llama-2-7B instruction-finetuned on MetaMathQA (395K samples, ~103M tokens).

Paper values (sources in lora_jax/experiments/paper_regimes.py): seq 1024, global batch 768,
cosine schedule with 10% warmup to 0.01x, decoupled LionW (0.9, 0.95), weight decay 0, clip 1.0;
LR full FT 1e-5, LoRA 1e-4 (r=256: 5e-5); 1, 2, 4, 8, 16 epochs; Llama-2-7b-chat-hf tokenizer.
Packing: packing_ratio 3 as code IFT (project choice: our notes of the authors' table give no
MetaMathQA step count), 395,000 // (3 x 768) = 171 steps per epoch.

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
WEIGHT_DECAY = 0.0
EPOCHS = (1, 2, 4, 8, 16)
NUM_SAMPLES = 395_000  # rows of MetaMathQA-395K.json
PACKING_RATIO = 3.0  # project choice (as code IFT): 171 steps per epoch
CHECKPOINT_EVERY = 200  # steps
LR_SEARCH_BUDGET = {"epochs": 2.0}
LR_GRID = {"full": (5e-6, 1e-5, 2e-5, 5e-5), "lora": (2e-5, 5e-5, 1e-4, 2e-4)}

# Evaluated after training with `lora-jax eval --tasks gsm8k,forgetting` (eval.tasks); the
# paper's settings are lora-jax eval's defaults (lora_jax.evals.runner.EvalOptions).
EVAL_TASKS = ("gsm8k", "forgetting")


(get_config, run_name, get_sweep, branch_of, describe,
 follow_ups) = common.entry_points(globals())
