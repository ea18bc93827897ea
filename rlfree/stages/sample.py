"""`rlfree sample`: draw from pi* at inference time, with no training; one command, one output, several samplers.

The samplers (`rlfree.samplers`: soft best-of-N, guidance between two models, energy-guided sampling, classifier-free
guidance as soft best-of-N) each write `OUTPUT_DIR/picked`, `--num_picks` rows per prompt with `pick_index`,
`pick_probability` and what the pick cost (`cost_sequences`, `cost_tokens`, `cost_model_tokens`: tokens times the
models that ran on them, `cost_reward_calls`), summed in the sidecar's `cost`, so samplers and trained models compare
at equal compute. The flags of this command are the shared ones (`SampleSettings`) and every sampler's own options.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from datasets import Dataset

from ..samplers import all_samplers
from ..samplers.base import Sampler, SampleSettings, choose


@dataclass
class SampleConfig(*(sampler.options for sampler in all_samplers()), SampleSettings):
    """Settings of `rlfree sample`: the shared settings and one sampler's flags (its selecting flag set)."""

    @property
    def reward_required(self) -> bool:
        """Whether the chosen sampler scores with a reward (asked before the choice is checked: with none chosen, the
        default soft best-of-N's answer)."""
        chosen = [sampler for sampler in all_samplers() if sampler.selected(self)]
        return chosen[0].uses_reward if len(chosen) == 1 else not chosen

    def __post_init__(self):
        super().__post_init__()
        _ = self.sampler  # choosing it checks the settings, before anything is made

    @functools.cached_property
    def sampler(self) -> Sampler:
        """The one sampler whose flag is set, its settings checked."""
        return choose(self, all_samplers())


def sample(config: SampleConfig) -> Dataset:
    return config.sampler.run(config)


def sample_command(config: SampleConfig) -> str:
    return f"wrote {len(sample(config))} picked completions to {config.output_dir}/picked"
