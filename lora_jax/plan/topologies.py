"""TPU chips and slices: published per-chip figures and the slice names `plan` accepts.

A slice is named as Cloud TPU names accelerator types (`v5e-8`, `v5p-16`, `v4-32`, `v6e-8`;
`v5litepod-8` is an alias of `v5e-8`) or as a libtpu topology (`v5e:2x4`, `v5p:2x2x2`).
For v4 and v5p the number in the name counts TensorCores (two per chip), for v5e and v6e chips.

The figures below are the vendor's published peaks, used only for the roofline ESTIMATE that
`plan` prints; the memory verdict comes from the compiler.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  family: str
  hbm_bytes: int  # per chip
  peak_bf16_flops: float  # per chip, FLOP/s
  hbm_bytes_per_s: float  # per chip
  ici_bytes_per_s: float  # per chip, all links together (for the analytic search only)
  cores_per_name_unit: int  # TensorCores counted per chip by the accelerator-type name
  source: str


# Sources: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<family>),
# "Chip specifications" tables, as published in 2024-2025.
CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1200 GB/s, 275 TFLOP/s bf16, ICI 6 x 50 GB/s
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 300e9, 2,
               "cloud.google.com/tpu/docs/v4 (chip specifications)"),
    # cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 819 GB/s, 197 TFLOP/s bf16, ICI 1600 Gbit/s
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 200e9, 1,
                "cloud.google.com/tpu/docs/v5e (chip specifications)"),
    # cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s, 459 TFLOP/s bf16, ICI 4800 Gbit/s
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 600e9, 2,
                "cloud.google.com/tpu/docs/v5p (chip specifications)"),
    # cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 1640 GB/s, 918 TFLOP/s bf16, ICI 3584 Gbit/s
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 448e9, 1,
                "cloud.google.com/tpu/docs/v6e (chip specifications)"),
}
ALIASES = {"v5litepod": "v5e"}
FAMILY_ORDER = ("v5e", "v6e", "v4", "v5p")  # among slices of equal chip count, cheaper first

# Standard slices, smallest first: accelerator-type name -> libtpu topology (chips laid out).
SLICES: dict[str, str] = {
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8",
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as asked for
  topology: str  # libtpu topology name
  chip: Chip

  @property
  def num_chips(self) -> int:
    return _num_chips(self.topology)


def _num_chips(topology: str) -> int:
  n = 1
  for d in topology.split(":")[1].split("x"):
    n *= int(d)
  return n


def resolve(name: str) -> Slice:
  """A Slice from an accelerator-type name (`v5e-8`) or a topology (`v5e:2x4`); ValueError
  naming the known slices otherwise."""
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m:
    family = ALIASES.get(m.group(1), m.group(1))
    text = SLICES.get(f"{family}-{m.group(2)}", "")
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  if not m or ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
    raise ValueError(f"unknown TPU slice {name!r}: use one of {', '.join(SLICES)}, a topology "
                     "such as v5e:2x4 or v5p:2x2x2, or cpu")
  family = ALIASES.get(m.group(1), m.group(1))
  return Slice(name=name, topology=f"{family}:{m.group(2)}", chip=CHIPS[family])


def standard_slices(max_chips: int = 64) -> list[Slice]:
  """Every standard slice up to `max_chips` chips, fewest chips first (ties: cheaper family)."""
  out = [s for s in map(resolve, SLICES) if s.num_chips <= max_chips]
  return sorted(out, key=lambda s: (s.num_chips, FAMILY_ORDER.index(s.chip.family)))
