"""The seam between rlfree's diffusion stages and a pipeline's architecture: a `Layout` says what a pipeline folder
holds (read without loading weights) and how its denoiser is driven: its conditioning, the shape of a sample, the
scheduler's timesteps, one network pass, the decoding to images and where LoRA goes. The stages call only these; a new
pipeline architecture is one file in this folder and one entry in `LAYOUTS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...errors import StageInputError
from ...sources import model_file

# Components a pipeline may hold that rlfree leaves alone (saved as null when absent).
IGNORED_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "image_encoder"})
Condition = dict[str, torch.Tensor]  # the denoiser's conditioning, every tensor batched along dim 0


@dataclass(frozen=True)
class Layout:
    """A pipeline architecture, as read from its folder: the denoiser's config, how it is conditioned ("none",
    "class": class labels, "text": the prompt's text embeddings) and the VAE's downsampling (1 in pixel space)."""

    config: dict
    conditioning: str
    vae_scale_factor: int = 1

    name: ClassVar[str]  # what the refusals and records call it
    denoiser: ClassVar[str]  # the pipeline component that denoises, and trains
    pipelines: ClassVar[tuple[str, ...]] = ()  # the diffusers pipeline classes served (model_index's _class_name)
    required: ClassVar[frozenset[str]]
    optional: ClassVar[frozenset[str]] = frozenset()
    flow_times: ClassVar[str] = "logit_normal"  # how flow-matching training draws times (as diffusers' scripts do)

    @classmethod
    def serves(cls, pipeline_class: str, components: set[str]) -> bool:
        return pipeline_class in cls.pipelines

    @classmethod
    def read(cls, path: str, pipeline_class: str, components: set[str]) -> Layout:
        """The layout of the folder `path`, or a refusal naming the components it lacks or has in excess."""
        required = cls.required_for(components)
        extra = sorted(components - required - cls.optional - IGNORED_COMPONENTS)
        missing = sorted(required - components)
        if extra or missing:
            raise StageInputError(
                f"--model_name_or_path {path}: a {pipeline_class} with components {sorted(components)}; rlfree's "
                f"{cls.name} layout takes {sorted(required)}"
                f"{f' (and optionally {sorted(cls.optional)})' if cls.optional else ''}"
                f"{f', not {extra}' if extra else f', and it lacks {missing}'}"
            )
        config = json.loads(model_file(path, f"{cls.denoiser}/config.json").read_text())
        cls.check_config(path, pipeline_class, config)
        vae = model_file(path, "vae/config.json")
        scale = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae is not None else 1
        return cls(config=config, conditioning=cls.conditioning_of(config, components), vae_scale_factor=scale)

    @classmethod
    def check_config(cls, path: str, pipeline_class: str, config: dict) -> None:
        """Refuse a denoiser whose inputs this layout does not supply."""

    @classmethod
    def required_for(cls, components: set[str]) -> frozenset[str]:
        return cls.required

    @classmethod
    def conditioning_of(cls, config: dict, components: set[str]) -> str:
        return "text"

    @property
    def num_classes(self) -> int | None:
        return self.config.get("num_class_embeds") if self.conditioning == "class" else None

    @property
    def architecture(self) -> dict:
        """The denoiser's config without the bookkeeping (`_name_or_path`, versions): what two mixable denoisers
        (RLG's reference and tuned model) share."""
        return {key: value for key, value in self.config.items() if not key.startswith("_")}

    @property
    def adapter_dir(self) -> str:
        """Where `train --use_peft` writes the denoiser's LoRA adapter, beside the merged pipeline."""
        return f"{self.denoiser}_lora"

    def network(self, pipeline) -> torch.nn.Module:
        return getattr(pipeline, self.denoiser)

    def sample_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """[C, H, W] of a model-space sample at `resolution` pixels (default: the denoiser's sample size)."""
        if resolution is None:
            size = self.config["sample_size"]
            height, width = (size, size) if isinstance(size, int) else size
        else:
            height = width = resolution // self.vae_scale_factor
        return self.config["in_channels"], height, width

    def check_resolution(self, resolution: int, path: str) -> None:
        if resolution % self.vae_scale_factor:
            raise StageInputError(
                f"--resolution {resolution}: {path}'s VAE downsamples by {self.vae_scale_factor}; give a multiple of it"
            )

    def set_timesteps(self, scheduler, num_inference_steps: int, shape: tuple[int, ...]) -> None:
        scheduler.set_timesteps(num_inference_steps)

    def condition(self, pipeline, prompts: list[str], class_labels: torch.Tensor | None, device) -> Condition:
        """The denoiser's conditioning for a batch, as the pipeline's own `__call__` computes it."""
        raise NotImplementedError

    def null_condition(self, pipeline, count: int, null_class: int | None, device) -> Condition:
        """The conditioning classifier-free guidance contrasts with: what the pipeline uses for an empty negative
        prompt (or a class-conditional UNet's null class)."""
        raise NotImplementedError

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """One pass of the denoiser on model-space samples `x` ([B, C, H, W]) at scheduler time(s) `t`."""
        raise NotImplementedError

    def decode(self, pipeline, samples: torch.Tensor) -> np.ndarray:
        return to_images(samples, getattr(pipeline, "vae", None))

    def lora_targets(self, network: torch.nn.Module) -> list[str]:
        """What `--lora_target_modules all-linear` means on this denoiser."""
        raise NotImplementedError


@torch.no_grad()
def to_images(samples: torch.Tensor, vae=None) -> np.ndarray:
    """[B, H, W, C] floats in [0, 1], exactly as a pipeline's `output_type="np"` turns its samples into images:
    latents go through the VAE's decoder first."""
    if vae is not None:
        latents = samples.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents + vae.config.shift_factor
        samples = vae.decode(latents, return_dict=False)[0]
    return (samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
