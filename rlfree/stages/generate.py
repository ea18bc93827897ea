"""Stage 1: sample N completions per prompt and record what the weights need.

For a causal LM, `ref_logprob` is log pi_ref(o|q) from the model's full softmax at temperature 1, read in a
teacher-forced pass over the exact generated ids (or the sampling pass itself, where it sampled pi_ref's own softmax);
`proposal_logprob` is log p(o|q) of the sampler actually used (temperature, top-k, top-p, the engine's own numerics
with `--backend vllm`, and with `--ref_model` another model altogether). The weighting stage corrects for the
difference, so sampling from any proposal still targets pi_ref. What each family writes is its own
(`rlfree.family`); the stage resolves the family from the model and records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from datasets import Dataset

from ..data import check_output_dir, folder_stamp
from ..family import Family, family_of_model
from ..options import GenerationSettings, LoadOptions, PromptOptions, SamplerOptions, options_of
from ..sources import content_fingerprint


@dataclass
class GenerateConfig(GenerationSettings):
    """Settings of `rlfree generate`: checked for every family, then for the model's own."""

    def __post_init__(self):
        super().__post_init__()
        self.checked_family()

    @property
    def family(self) -> Family:
        """The model's family, as its folder (or Hub repository) says now: a config may be made before its model is
        written (a demo's or a recipe's later stages). A Hub id is looked up once per process."""
        return family_of_model(self.model_name_or_path)

    def checked_family(self) -> Family:
        """The model's family, with these settings checked against what it refuses."""
        family = self.family
        family.check_prompts(self.prompts)
        family.check_generate(self)
        return family


def generate_config(source: Any, output_dir: str, num_samples: int, **fields: Any) -> GenerateConfig:
    """The `generate` stage another command runs (a sampler's candidates, an evaluation's samples): `source`'s model,
    prompts, and loading, prompt and sampler flags."""
    shared = options_of(LoadOptions, source) | options_of(PromptOptions, source) | options_of(SamplerOptions, source)
    return GenerateConfig(
        **shared,
        model_name_or_path=source.model_name_or_path,
        prompts=source.prompts,
        output_dir=output_dir,
        num_samples=num_samples,
        **fields,
    )


def check_output(config: GenerateConfig) -> None:
    """Refuse an --output_dir that generating would destroy (`check_output_dir`), before anything is made."""
    inputs = {"--model_name_or_path": config.model_name_or_path, "--ref_model": config.ref_model}
    check_output_dir(config.output_dir, "generation", asdict(config), inputs | {"--prompts": config.prompts})


def generation_settings(config: GenerateConfig, family: Family) -> dict:
    """What the stage records about a run, whatever the family: its flags, the family, and stamps of its inputs (a
    resumed run whose model or prompts changed starts over)."""
    settings = asdict(config) | {
        "family": family.name,
        "prompts_fingerprint": content_fingerprint(config.prompts),
        "model_stamp": folder_stamp(config.model_name_or_path),
    }
    if config.ref_model is not None:
        settings["ref_model_stamp"] = folder_stamp(config.ref_model)
    return settings


def generate(config: GenerateConfig) -> Dataset:
    """Run the generation stage: shard by shard, across `accelerate launch` processes, resuming an interrupted run.

    Every sample's randomness comes from (seed, prompt index, sample index), so the dataset is the same whatever the
    batch size, the shard size or the number of processes, and a resumed run equals an uninterrupted one.
    """
    check_output(config)
    family = config.checked_family()  # resolved once, from the model as it is now
    return family.generate(config, generation_settings(config, family))


def generate_command(config: GenerateConfig) -> str:
    return f"wrote {len(generate(config))} completions to {config.output_dir}"
