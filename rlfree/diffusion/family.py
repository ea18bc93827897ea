"""Diffusers pipelines as a family: a model folder or Hub repository that holds `model_index.json`."""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset

from ..device import default_device
from ..family import Family
from ..options import GenerationSettings, check_guidance_scale
from ..rewards.images import ImageRewardModel
from ..sources import is_local_path, model_file
from ..training import ModelConfig, RLFreeConfig
from .generation import generate_samples
from .layouts import read_layout
from .lora import add_lora
from .pipeline import load_pipeline
from .trainer import TRAIN_COLUMNS, DiffusionTrainer


class DiffusionFamily(Family):
    name: ClassVar[str] = "diffusion"
    # A diffusion model gives no exact likelihood: its samples come from the base pipeline itself, unweighted.
    has_likelihood: ClassVar[bool] = False
    passes_per_sample: ClassVar[int] = 1  # one network pass per denoising step
    train_columns: ClassVar[tuple[str, ...]] = TRAIN_COLUMNS
    prompts_optional: ClassVar[bool] = True  # an unconditional pipeline takes none (`generate_samples` checks)

    def recognizes(self, name_or_path: str) -> bool:
        """A diffusers pipeline: the family is chosen by the model, not by a flag."""
        if is_local_path(name_or_path):
            return model_file(name_or_path, "model_index.json") is not None
        return _is_hub_pipeline(name_or_path)

    def check_generate(self, config: GenerationSettings) -> None:
        if config.guidance_scale is not None:  # RLG's W beside --ref_model, else a text-to-image pipeline's CFG scale
            check_guidance_scale(config.guidance_scale)

    def generate(self, config: GenerationSettings, settings: dict) -> Dataset:
        return generate_samples(config, settings)

    def sample_lengths(self, dataset: Dataset, num_inference_steps: int) -> torch.Tensor:
        return torch.full((len(dataset),), num_inference_steps)

    def completion_statistics(self, columns: dict[str, np.ndarray]) -> dict:
        return {}  # images: no tokens, no finish reasons

    def reward_model(self, name_or_path: str, trust_remote_code: bool, device: torch.device) -> ImageRewardModel:
        return ImageRewardModel(name_or_path, trust_remote_code, device)

    def guided_log_weights(self, candidates: Dataset, scale: float) -> torch.Tensor:
        # RLG's step-by-step mix is the sample itself: nothing to reweight.
        return torch.zeros(len(candidates), dtype=torch.float64)

    def check_train(self, model_config: ModelConfig) -> None:
        pass  # the pipeline's layout is checked when it loads

    def build_trainer(self, model_config: ModelConfig, args: RLFreeConfig, dataset: Dataset) -> DiffusionTrainer:
        path = model_config.model_name_or_path
        layout = read_layout(path)
        pipeline = load_pipeline(path, model_config.dtype, default_device())
        network, lora = layout.network(pipeline), ""
        if model_config.use_peft:
            options = [model_config.lora_r, model_config.lora_alpha, model_config.lora_dropout]
            network = add_lora(network, *options, model_config.lora_target_modules, layout)
            lora = (
                f"LoRA r={options[0]} alpha={options[1]} (adapter in {layout.adapter_dir}/, merged into "
                f"{layout.denoiser}/)"
            )
        return DiffusionTrainer(pipeline, args, dataset, path, network, lora, layout=layout)

    def needs_full_weights(self, model_config: ModelConfig) -> bool:
        return model_config.use_peft  # a LoRA pipeline is always saved merged

    def save_trained(self, trainer: DiffusionTrainer, model_config: ModelConfig) -> None:
        trainer.save_pipeline(trainer.args.output_dir)


@functools.cache
def _is_hub_pipeline(repo_id: str) -> bool:
    """One Hub look-up per repository and process (a local folder is checked afresh: it may be written meanwhile)."""
    return model_file(repo_id, "model_index.json") is not None
