"""rlfree: align language models without reinforcement learning.

The KL-regularized RLHF optimum pi*(o|q) ~ pi_ref(o|q) exp(r(q,o)/beta) is fitted by weighted maximum likelihood
in four stages that talk through datasets on disk: generate -> score -> weight -> train.

The public names import on first use (PEP 562), so `import rlfree.cli` and `rlfree --help` load no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .evaluation.inspection import InspectConfig
    from .evaluation.inspection import inspect as inspect_stage
    from .lm.trainer import RLFreeTrainer
    from .stages.generate import GenerateConfig, generate
    from .stages.run import RunConfig, run_recipe
    from .stages.score import ScoreConfig, score
    from .stages.train import train
    from .stages.weight import WeightConfig, weight
    from .training import ModelConfig, RLFreeConfig

__version__ = "0.1.0"

# public name -> (submodule, its name there)
_EXPORTS = {
    "GenerateConfig": ("stages.generate", "GenerateConfig"),
    "InspectConfig": ("evaluation.inspection", "InspectConfig"),
    "RunConfig": ("stages.run", "RunConfig"),
    "ModelConfig": ("training", "ModelConfig"),
    "RLFreeConfig": ("training", "RLFreeConfig"),
    "RLFreeTrainer": ("lm.trainer", "RLFreeTrainer"),
    "ScoreConfig": ("stages.score", "ScoreConfig"),
    "WeightConfig": ("stages.weight", "WeightConfig"),
    "generate": ("stages.generate", "generate"),
    "inspect_stage": ("evaluation.inspection", "inspect"),
    "run_recipe": ("stages.run", "run_recipe"),
    "score": ("stages.score", "score"),
    "train": ("stages.train", "train"),
    "weight": ("stages.weight", "weight"),
}

__all__ = [
    "GenerateConfig",
    "InspectConfig",
    "RunConfig",
    "ModelConfig",
    "RLFreeConfig",
    "RLFreeTrainer",
    "ScoreConfig",
    "WeightConfig",
    "generate",
    "inspect_stage",
    "run_recipe",
    "score",
    "train",
    "weight",
]


def __getattr__(name: str) -> Any:
    """Import a public name's submodule the first time the name is asked for, then keep it."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
