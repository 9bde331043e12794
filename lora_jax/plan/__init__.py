"""`lora-jax plan`: a run compiled ahead of time for a TPU slice (or the local CPU) without
devices, with its memory per device, whether it fits, and a roofline estimate of its speed.

  topologies    published chip figures and the slice names accepted
  compile       ahead-of-time compilation of the train step, eval forward and generation steps
  memory_model  analytic memory / step-time model that ranks candidate settings
  search        `plan(cfg, target, auto=...)`: rank (with --auto), compile the best, report
  report        the plan as JSON and as text
"""

from lora_jax.plan.compile import LibtpuMissing
from lora_jax.plan.report import format_text
from lora_jax.plan.search import PROGRAMS, plan

__all__ = ["LibtpuMissing", "PROGRAMS", "format_text", "plan"]
