"""Reward models for images (`rlfree score --reward_model PATH` on a diffusion pipeline's samples).

Two kinds that `transformers` loads from a folder or the Hub, each with the image processor saved beside it:
- a CLIP model (`CLIPModel`): the reward is logit_scale·cos(text embedding of the prompt, image embedding), the
  prompt-image agreement PickScore computes (PickScore_v1 is a CLIPModel) and CLIPScore up to its scale;
- an image classifier (`AutoModelForImageClassification`): the reward is logit 0, as for text reward models; an
  aesthetic or preference scorer fine-tuned as a one-label regressor is such a model.
Each completion is the image as the pipeline's `output_type="np"` gives it ([H, W, C] floats in [0, 1]); grayscale
images are repeated to RGB when the model takes three channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..device import default_device


class ImageRewardModel:
    """An image reward model with TRL's reward signature, `f(prompts, completions, **kwargs) -> list[float]`."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, device: torch.device | None = None):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, AutoTokenizer

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.clip = config.model_type == "clip"
        if self.clip:
            from transformers import CLIPModel

            self.model = CLIPModel.from_pretrained(name_or_path)
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.channels = config.vision_config.num_channels
        else:
            self.model = AutoModelForImageClassification.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code
            )
            self.channels = getattr(config, "num_channels", 3)
        self.processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.model = self.model.to(device or default_device()).eval()
        self.__name__ = Path(name_or_path).name

    def pixel_values(self, completions: list) -> torch.Tensor:
        images = [np.asarray(image, dtype=np.float32) for image in completions]
        if self.channels == 3:
            images = [np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images]
        # The images are already floats in [0, 1]: the processor resizes and normalizes, without rescaling by 1/255.
        inputs = self.processor(images=images, do_rescale=False, return_tensors="pt")
        return inputs["pixel_values"].to(self.model.device, self.model.dtype)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        pixels = self.pixel_values(completions)
        if not self.clip:
            return self.model(pixel_values=pixels).logits[:, 0].float().tolist()
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        text_embeds = projected(self.model.get_text_features(**text))
        image_embeds = projected(self.model.get_image_features(pixel_values=pixels))
        return (self.model.logit_scale.exp() * (text_embeds * image_embeds).sum(-1)).float().tolist()


def projected(features) -> torch.Tensor:
    """CLIP's projected embedding, unit-normalized: transformers 5 returns it as the output's `pooler_output`, 4 as
    a tensor."""
    embeds = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(embeds, dim=-1)
