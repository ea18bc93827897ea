"""What a sampler is, and the settings every sampler shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from datasets import Dataset

from ..errors import StageInputError
from ..family import Family, family_of_model
from ..options import (
    LoadOptions,
    Options,
    PromptOptions,
    RewardOptions,
    SamplerOptions,
    prompts_field,
    require_output_dir,
    required_output_dir_field,
)


@dataclass
class SampleSettings(SamplerOptions, RewardOptions, PromptOptions, LoadOptions):
    """The settings of `rlfree sample` that every sampler shares; `SampleConfig` adds each sampler's options."""

    model_name_or_path: str = field(
        metadata={"help": "Model sampled from: pi_ref, or the tuned model with --guidance_scale."}
    )
    prompts: str | None = prompts_field(optional=True)
    output_dir: str = required_output_dir_field("Root folder: picked/ (the result) and the sampler's stages in it.")
    beta: float = field(
        default=1.0,
        metadata={"help": "KL coefficient: pick with probability softmax(r/beta); 0 = hard best-of-N."},
    )
    num_picks: int = field(
        default=1, metadata={"help": "Completions returned per prompt, each picked from its own candidates."}
    )
    shard_size: int = field(
        default=16, metadata={"help": "Prompts per shard of energy-guided sampling (written at once and resumed)."}
    )

    @property
    def family(self) -> Family:
        """The sampled model's family (a Hub id is looked up once per process)."""
        return family_of_model(self.model_name_or_path)


class Sampler:
    """One way of drawing from a target at inference time. Subclasses set the class attributes and implement
    `selected`, `run` and `describe`; `check` refuses settings (and families) the sampler cannot serve."""

    name: ClassVar[str]  # what sampling.json records
    flag: ClassVar[str]  # the flag that selects it
    usage: ClassVar[str]  # how to select it, for the "choose one sampler" error
    options: ClassVar[type[Options]]  # its own flags, an option group of SampleConfig
    uses_reward: ClassVar[bool]
    # Flags of other option groups that only mean something with this sampler: {field: why, shown when it is not chosen}
    exclusive: ClassVar[dict[str, str]] = {}

    def selected(self, config: SampleSettings) -> bool:
        raise NotImplementedError

    def check(self, config: SampleSettings) -> None:
        """Refuse settings this sampler cannot honour, before anything is made (the sampler is the one chosen)."""

    def run(self, config: SampleSettings) -> Dataset:
        """Draw `num_picks` per prompt into `output_dir/picked` (with `pick_index`, `pick_probability` and costs)."""
        raise NotImplementedError

    def describe(self, settings: dict) -> str:
        """The sampler and the settings that set its cost and target, from its `sampling.json`."""
        raise NotImplementedError


def choose(config: SampleSettings, samplers: list[Sampler]) -> Sampler:
    """The one sampler whose flag is set, checked with the shared settings; the others' exclusive flags refused."""
    require_output_dir(config)
    config.family.check_prompts(config.prompts)
    chosen = [sampler for sampler in samplers if sampler.selected(config)]
    if len(chosen) != 1:
        raise StageInputError(
            f"choose one sampler (got {', '.join(s.flag for s in chosen) or 'none'}): "
            + ", ".join(sampler.usage for sampler in samplers[:-1])
            + f", or {samplers[-1].usage}"
        )
    (sampler,) = chosen
    if config.num_picks < 1:
        raise StageInputError(f"--num_picks must be >= 1, got {config.num_picks}")
    for other in samplers:
        for name, why in other.exclusive.items():
            if other is not sampler and getattr(config, name) is not None:
                raise StageInputError(why)
    sampler.check(config)
    return sampler
