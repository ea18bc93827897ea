"""Causal language models as a family: any model that is not another family's (`rlfree.family`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset

from ..errors import StageInputError
from ..family import Family
from ..options import GenerationSettings, check_guidance
from ..rewards.scoring import RewardModel
from ..sources import load_model_config
from ..training import ModelConfig, RLFreeConfig
from .generation import generate_completions
from .guidance import guidance_log_weights
from .loading import load_tokenizer
from .trainer import TRAIN_COLUMNS, RLFreeTrainer, build_model

# Flags of `generate` that only mean something for diffusion pipelines (unset: None).
DIFFUSION_ONLY = ("resolution", "cfg_guidance_scale")


class LanguageModelFamily(Family):
    name: ClassVar[str] = "lm"
    has_likelihood: ClassVar[bool] = True
    # A candidate's tokens are drawn once and read once more (teacher-forced) for its log-probabilities.
    passes_per_sample: ClassVar[int] = 2
    train_columns: ClassVar[tuple[str, ...]] = TRAIN_COLUMNS

    def recognizes(self, name_or_path: str) -> bool:
        return True  # the catch-all: whatever the families before it in the registry did not take

    def check_generate(self, config: GenerationSettings) -> None:
        if config.guidance_scale is not None:
            check_guidance(config.guidance_scale, config.ref_model, config.backend)

    def generate(self, config: GenerationSettings, settings: dict) -> Dataset:
        # Refused here, not in `check_generate`: a Hub pipeline that cannot be looked up (offline) resolves to this
        # catch-all family when a recipe is parsed.
        set_flags = [f"--{name}" for name in DIFFUSION_ONLY if getattr(config, name) is not None]
        if set_flags:
            raise StageInputError(
                f"{', '.join(set_flags)}: for diffusion pipelines; {config.model_name_or_path} is a language model"
            )
        return generate_completions(config, settings)

    def sample_lengths(self, dataset: Dataset, num_inference_steps: int) -> torch.Tensor:
        return torch.tensor(dataset["num_tokens"])

    def completion_statistics(self, columns: dict[str, np.ndarray]) -> dict:
        tokens = columns["num_tokens"]
        reasons, counts = np.unique(columns["finish_reason"], return_counts=True)
        return {
            "num_tokens": {"mean": float(tokens.mean()), "median": float(np.median(tokens)), "max": int(tokens.max())},
            "finish_reasons": {str(r): float(c / len(tokens)) for r, c in zip(reasons, counts, strict=True)},
        }

    def reward_model(self, name_or_path: str, trust_remote_code: bool, device: torch.device) -> RewardModel:
        return RewardModel(name_or_path, trust_remote_code, device)

    def guided_log_weights(self, candidates: Dataset, scale: float) -> torch.Tensor:
        columns = {
            name: torch.tensor(candidates[name], dtype=torch.float64)
            for name in ("ref_logprob", "model_logprob", "proposal_logprob")
        }
        return guidance_log_weights(
            columns["ref_logprob"], columns["model_logprob"], columns["proposal_logprob"], scale
        )

    def check_train(self, model_config: ModelConfig) -> None:
        load_model_config("--model_name_or_path", model_config.model_name_or_path, model_config.trust_remote_code)

    def build_trainer(self, model_config: ModelConfig, args: RLFreeConfig, dataset: Dataset) -> RLFreeTrainer:
        tokenizer = load_tokenizer(model_config.model_name_or_path, model_config.trust_remote_code)
        return RLFreeTrainer(build_model(model_config), args, dataset, tokenizer)

    def needs_full_weights(self, model_config: ModelConfig) -> bool:
        return model_config.use_peft and model_config.merge_lora

    def save_trained(self, trainer: RLFreeTrainer, model_config: ModelConfig) -> None:
        trainer.save_trained(model_config)
