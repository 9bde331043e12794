"""`TrainingError` (training cannot start or continue) and the preempted run's exit status."""

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the conventional "terminated, may be requeued" status


class TrainingError(RuntimeError):
  """Training cannot start or continue (bad output dir, config mismatch, NaN loss, ...)."""
