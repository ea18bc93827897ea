"""Inference-time samplers of `rlfree sample`, behind one seam: each is a `Sampler` (`base.py`) in a file of its own.

`sample`, `evaluate` and `ab` know samplers only through this registry: the flags of `rlfree sample` are every
sampler's options, the one whose selecting flag is set runs, and a report describes a sampler's picks by its name.
A new sampler is a file holding a `Sampler` and one line here.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Sampler

# Name (what `sampling.json` records) -> "module:object".
SAMPLERS: dict[str, str] = {
    "soft_best_of_n": "rlfree.samplers.soft_best_of_n:SOFT_BEST_OF_N",
    "guided": "rlfree.samplers.guided:GUIDED",
    "energy_guided": "rlfree.samplers.energy_guided:ENERGY_GUIDED",
    "cfg_best_of_n": "rlfree.samplers.cfg_best_of_n:CFG_BEST_OF_N",
}


@functools.cache
def sampler_named(name: str) -> Sampler:
    module, attribute = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def all_samplers() -> list[Sampler]:
    return [sampler_named(name) for name in SAMPLERS]
