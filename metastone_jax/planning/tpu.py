"""Cloud TPU accelerator types: `v5e-8`, `v5p-64`, `v4-32`, `v6e-8` -> chips and HBM per chip.

Naming convention (the `--accelerator-type` of `gcloud compute tpus tpu-vm create`):

- v4 and v5p: the number counts TensorCores, two per chip (megacore: JAX sees one device per
  chip). `v4-32` is 16 chips; `v5p-16` is 8 chips (topology 2x2x2); `v5p-64` is 32 chips
  (2x4x4). "v5p-32 specifies a v5p TPU slice with 32 TensorCores (16 chips)":
  https://cloud.google.com/tpu/docs/v5p ; https://cloud.google.com/tpu/docs/v4
- v5e and v6e: the number counts chips, one TensorCore each (format v$VERSION-$CHIP_COUNT).
  The TPU API spells v5e `v5litepod-N`; both spellings are accepted.
  https://cloud.google.com/tpu/docs/v5e ; https://cloud.google.com/tpu/docs/v6e

HBM per chip, from the same pages: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB. The table reads
every figure as GiB (2^30 bytes): an upper bound on what one program can use, since the runtime
and XLA keep part of HBM for themselves (one reason the plan warns above 90%).
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1 << 30

# generation -> (HBM per chip in GiB, TensorCores per chip: 2 = the suffix counts TensorCores)
GENERATIONS: dict[str, tuple[int, int]] = {
    "v4": (32, 2),
    "v5e": (16, 1),
    "v5p": (95, 2),
    "v6e": (32, 1),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class TpuType:
    """One slice: `name` as given, its generation, chip count (= JAX devices) and HBM per chip."""

    name: str
    generation: str
    chips: int
    hbm_bytes: int

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GIB


def _expected() -> str:
    return (
        "expected GENERATION-COUNT with GENERATION one of v4, v5e (or v5litepod), v5p, v6e "
        "(e.g. v5e-8, v5p-64, v4-32, v6e-8)"
    )


def parse_tpu(name: str) -> TpuType:
    """`v5p-64` -> TpuType(chips=32, hbm 95 GiB); a ValueError names the string and the format."""
    m = re.fullmatch(r"\s*(v\d+[a-z]*)-(\d+)\s*", str(name).lower())
    generation = ALIASES.get(m.group(1), m.group(1)) if m else None
    if generation not in GENERATIONS:
        raise ValueError(f"tpu {name!r}: {_expected()}")
    hbm_gib, cores_per_chip = GENERATIONS[generation]
    count = int(m.group(2))
    if count < 1 or count % cores_per_chip:
        unit = "TensorCores (2 per chip): an even number" if cores_per_chip == 2 else "chips"
        raise ValueError(f"tpu {name!r}: the count after the dash is {unit}, got {count}")
    return TpuType(
        name=f"{m.group(1)}-{count}",
        generation=generation,
        chips=count // cores_per_chip,
        hbm_bytes=hbm_gib * GIB,
    )
