"""The paper's own numbers, to draw as reference series and to compare runs against.

Source: Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024 (arXiv 2405.09673),
supplementary Tables S1-S8 (Llama-2-7B), as transcribed in the team's
reference/paper_protocol.md. CPT columns are token budgets (each after its own cooldown), IFT
columns epochs. "Forgetting" is the mean accuracy of HellaSwag, ARC-Challenge and WinoGrande
(MosaicML Gauntlet). Methods: "full" (full finetuning) and "lora_r16" / "lora_r64" /
"lora_r256" (LoRA on all seven modules, alpha = 2r).
"""

from __future__ import annotations

SOURCE = ("Biderman et al. 2024, LoRA Learns Less and Forgets Less (TMLR), Tables S1-S8, "
          "Llama-2-7B")
CPT_TOKENS = (0.25e9, 0.5e9, 1e9, 2e9, 4e9, 8e9, 16e9, 20e9)
IFT_EPOCHS = (1, 2, 4, 8, 16)
METHODS = ("lora_r16", "lora_r64", "lora_r256", "full")

# table -> (regime, quantity, {method: values per budget})
TABLES = {
    "S1": ("code_cpt", "learning", {
        "lora_r16": (.143, .144, .141, .141, .154, .159, .162, .162),
        "lora_r64": (.142, .146, .141, .153, .157, .176, .194, .196),
        "lora_r256": (.144, .142, .143, .159, .159, .208, .211, .224),
        "full": (.152, .153, .172, .181, .218, .258, .255, .263)}),
    "S2": ("code_cpt", "forgetting", {
        "lora_r16": (.645, .642, .645, .642, .644, .640, .638, .635),
        "lora_r64": (.646, .644, .646, .646, .639, .634, .626, .626),
        "lora_r256": (.644, .645, .643, .639, .636, .630, .618, .617),
        "full": (.625, .624, .625, .616, .599, .583, .551, .545)}),
    "S3": ("math_cpt", "learning", {
        "lora_r16": (.162, .157, .161, .155, .165, .156, .152, .158),
        "lora_r64": (.163, .167, .150, .166, .164, .168, .179, .163),
        "lora_r256": (.162, .161, .140, .170, .193, .196, .203, .202),
        "full": (.155, .152, .165, .158, .224, .238, .283, .293)}),
    "S4": ("math_cpt", "forgetting", {
        "lora_r16": (.640, .641, .646, .641, .643, .641, .636, .637),
        "lora_r64": (.640, .640, .638, .637, .643, .634, .634, .627),
        "lora_r256": (.638, .638, .637, .634, .633, .620, .620, .616),
        "full": (.634, .634, .640, .630, .629, .619, .613, .618)}),
    "S5": ("code_ift", "learning", {
        "lora_r16": (.197, .275, .358, .338, .324),
        "lora_r64": (.249, .339, .417, .392, .405),
        "lora_r256": (.299, .385, .498, .437, .466),
        "full": (.302, .464, .470, .497, .416)}),
    "S6": ("code_ift", "forgetting", {
        "lora_r16": (.653, .648, .652, .646, .609),
        "lora_r64": (.652, .651, .632, .580, .510),
        "lora_r256": (.655, .659, .631, .552, .517),
        "full": (.595, .579, .512, .446, .414)}),
    "S7": ("math_ift", "learning", {
        "lora_r16": (.447, .528, .580, .578, .569),
        "lora_r64": (.527, .588, .624, .624, .595),
        "lora_r256": (.557, .607, .625, .634, .594),
        "full": (.604, .641, .642, .619, .599)}),
    "S8": ("math_ift", "forgetting", {
        "lora_r16": (.628, .617, .616, .616, .596),
        "lora_r64": (.617, .609, .608, .586, .568),
        "lora_r256": (.613, .607, .599, .584, .567),
        "full": (.598, .599, .590, .572, .559)}),
}
LEARNING_TASK = {"code_cpt": "humaneval", "code_ift": "humaneval", "math_cpt": "gsm8k",
                 "math_ift": "gsm8k"}  # HumanEval pass@1 / GSM8K strict match


def budgets(regime: str) -> tuple[float, ...]:
  """The table columns: token budgets (CPT) or epochs (IFT)."""
  return CPT_TOKENS if regime.endswith("cpt") else IFT_EPOCHS


def series(regime: str, quantity: str, method: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(budgets, values) of `quantity` ("learning" / "forgetting") for `method` in `regime`."""
  for table, (reg, q, values) in TABLES.items():
    if reg == regime and q == quantity:
      return budgets(regime), values[method]
  raise KeyError(f"no paper table for {regime} {quantity}")


def table_name(regime: str, quantity: str) -> str:
  return next(t for t, (reg, q, _) in TABLES.items() if reg == regime and q == quantity)
