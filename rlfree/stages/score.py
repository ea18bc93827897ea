"""Stage 2: score every completion with reward functions (TRL signature) and/or reward models."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data import check_output_dir, load_stage, process_state, run_in_shards
from ..errors import check_ranges
from ..family import family_of_data
from ..options import RewardOptions, options_of
from ..rewards.scoring import (
    RewardFunction,
    check_rewards,
    load_reward_function,
    reward_fingerprints,
    score_dataset,
)
from ..sources import load_model_config


@dataclass
class ScoreConfig(RewardOptions):
    """Settings of `rlfree score`."""

    input_dir: str = field(metadata={"help": "Output folder of `rlfree generate`."})
    output_dir: str = field(metadata={"help": "Where the scored dataset is written."})
    drop_invalid_rewards: bool = field(
        default=False,
        metadata={"help": "Drop rows whose reward is NaN/inf/None instead of stopping with an error."},
    )
    batch_size: int = field(default=64, metadata={"help": "Completions scored per call."})
    shard_size: int = field(
        default=1024,
        metadata={"help": "Completions per shard: the unit written at once, split across processes and resumed."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom reward-model code from the Hub."})

    def __post_init__(self):
        super().__post_init__()
        check_ranges(
            self, {"batch_size": (self.batch_size >= 1, ">= 1"), "shard_size": (self.shard_size >= 1, ">= 1")}
        )


def score_config(source: Any, input_dir: str | Path, output_dir: str | Path) -> ScoreConfig:
    """The `score` stage another command runs (a sampler's candidates, an evaluation's samples), with `source`'s
    reward flags and batch size."""
    return ScoreConfig(
        **options_of(RewardOptions, source),
        input_dir=str(input_dir),
        output_dir=str(output_dir),
        batch_size=source.batch_size,
    )


def check_output(config: ScoreConfig) -> None:
    """Refuse an --output_dir that scoring would destroy (`check_output_dir`), before anything is made."""
    check_output_dir(config.output_dir, "scoring", asdict(config), {"--input_dir": config.input_dir})


def score(config: ScoreConfig) -> Dataset:
    """Run the scoring stage: shard by shard, across `accelerate launch` processes, resuming an interrupted run.

    Scoring a folder that was scored (or weighted) before replaces its rewards, and leaves out its weights."""
    state = process_state()
    check_output(config)
    hint = "Score the output of `rlfree generate`."
    dataset = load_stage(config.input_dir, ("prompt", "completion"), hint=hint, stage="scoring")
    reward_functions = [load_reward_function(spec) for spec in config.reward]
    for path in config.reward_model:
        load_model_config("--reward_model", path, config.trust_remote_code)
    # The input's fingerprint ties unfinished shards to the data they scored, the rewards' to the code that scored
    # them: a regenerated input or an edited reward function starts over.
    # The family's reward models score its completions (text, or a pipeline's images).
    family = family_of_data(config.input_dir)
    settings = asdict(config) | {
        "family": family.name,
        "input_fingerprint": dataset._fingerprint,
        "reward_fingerprints": reward_fingerprints(config),
    }

    @functools.cache
    def functions() -> list[RewardFunction]:
        """Loaded on the first shard this process scores: a finished run loads no reward model."""
        models = [family.reward_model(path, config.trust_remote_code, state.device) for path in config.reward_model]
        return reward_functions + models

    def make_shard(rows: range) -> Dataset:
        return score_dataset(dataset.select(rows), functions(), config.reward_weights, config.batch_size, rows.start)

    return run_in_shards(
        config.output_dir,
        "scoring",
        settings,
        len(dataset),
        config.shard_size,
        make_shard,
        input_dir=config.input_dir,
        finish=lambda scored: (check_rewards(scored, config.drop_invalid_rewards), {}),
        finish_only=("drop_invalid_rewards",),
    )


def score_command(config: ScoreConfig) -> str:
    return f"wrote {len(score(config))} scored completions to {config.output_dir}"
