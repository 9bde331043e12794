"""Evaluation tasks: the paper's learning (HumanEval, GSM8K) and forgetting (HellaSwag, ARC, WinoGrande)
measures, log-likelihood scoring, pass@k, diversity and the results files; `runner.run_evals` runs them."""
