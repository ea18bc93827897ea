"""The one registry of `rlfree` commands: what each is, the dataclasses its flags fill, and the function it runs.

Everything else (the CLI's dispatch and usage text, recipes' validation of keys, `rlfree run`'s stages) reads this
table, so a new command is one entry here. Targets are "module:name" strings imported on use: `rlfree --help` loads
no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import StageInputError


@dataclass(frozen=True)
class Command:
    summary: str
    configs: tuple[str, ...]  # dataclasses the flags fill, "module:Class"
    run: str  # "module:function" taking those dataclasses; a str it returns is printed, anything else is not
    extra: tuple[str, str] | None = None  # (pip extra, the library it brings) when not installed by default
    positional: str | None = None  # a flag its first bare argument stands for (`rlfree inspect DIR`)
    needs_recipe: bool = False  # `run` is the recipe: its function takes the --config path as `recipe`


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "sample N completions per prompt from the reference model, with exact log-probabilities",
        ("rlfree.stages.generate:GenerateConfig",),
        "rlfree.stages.generate:generate_command",
    ),
    "score": Command(
        "add rewards from a Python function (TRL signature) or a reward model",
        ("rlfree.stages.score:ScoreConfig",),
        "rlfree.stages.score:score_command",
    ),
    "weight": Command(
        "self-normalized importance weights: rlhf exp(r/beta), rlif pi_ref^gamma, or both",
        ("rlfree.stages.weight:WeightConfig",),
        "rlfree.stages.weight:weight_command",
    ),
    "train": Command(
        "weighted maximum likelihood (a transformers Trainer); also under `accelerate launch -m rlfree`",
        ("rlfree.training:ModelConfig", "rlfree.training:RLFreeConfig"),
        "rlfree.stages.train:train_command",
    ),
    "run": Command(
        "every stage of a recipe (--config recipe.yaml) in order, for `rounds` rounds; skips finished stages",
        ("rlfree.stages.run:RunConfig",),
        "rlfree.stages.run:run_command",
        needs_recipe=True,
    ),
    "inspect": Command(
        "summary and plots of any stage's output folder: rewards, weights, ESS, KL against beta",
        ("rlfree.evaluation.inspection:InspectConfig",),
        "rlfree.evaluation.inspection:inspect",
        positional="--input_dir",
    ),
    "sample": Command(
        "soft best-of-N: one of N reference samples with probability softmax(r / beta), no training",
        ("rlfree.stages.sample:SampleConfig",),
        "rlfree.stages.sample:sample_command",
    ),
    "evaluate": Command(
        "a model's mean reward and its KL to a reference (k1, k3), with confidence intervals",
        ("rlfree.evaluation.evaluate:EvaluateConfig",),
        "rlfree.evaluation.evaluate:evaluate",
    ),
    "ab": Command(
        "model A against model B on the same prompts and reward: win rate with a bootstrap interval",
        ("rlfree.evaluation.evaluate:ABConfig",),
        "rlfree.evaluation.evaluate:ab",
    ),
    "baseline": Command(
        "the on-policy baseline: TRL's RLOO on the same prompts, reward and beta (pip install -e '.[baselines]')",
        ("rlfree.baselines.rloo:BaselineConfig", "rlfree.baselines.rloo:BaselineRLOOConfig"),
        "rlfree.baselines.rloo:baseline_command",
        extra=("baselines", "TRL"),
    ),
    "demo": Command(
        "the whole pipeline offline on a tiny arithmetic task, with exact KL figures",
        ("rlfree.demos:DemoConfig",),
        "rlfree.demos:run_demo",
    ),
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def command_types(command: str) -> tuple[type, ...]:
    """The dataclasses a command's flags fill; a missing optional dependency is an error naming the extra."""
    entry = COMMANDS[command]
    try:
        return tuple(_load(target) for target in entry.configs)
    except ImportError as error:
        if entry.extra is None:
            raise
        extra, library = entry.extra
        raise StageInputError(
            f"`rlfree {command}` needs {library} ({error}); install it from the repository root with: "
            f"pip install -e '.[{extra}]'"
        ) from None


def command_function(command: str) -> Callable[..., str | None]:
    return _load(COMMANDS[command].run)
