"""Image reward models score a pipeline's images."""

from __future__ import annotations

import numpy as np
import torch

from rlfree.diffusion import tiny
from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig, score


def test_image_reward_models_score_the_images(text_pipeline, text_prompts, pipeline_config, tmp_path):
    """`--reward_model` on a pipeline's samples: a CLIP model scores logit_scale·cos(prompt, image) (PickScore's
    formula) and an image classifier its logit 0, each through its own image processor; checked by hand."""
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config={"vocab_size": len(tiny.TEXT_WORDS), "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 6,
                         "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
            vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 16, "patch_size": 4},
            projection_dim=8,
        )
    )  # fmt: skip
    clip.save_pretrained(tmp_path / "clip")
    AutoTokenizer.from_pretrained(text_pipeline / "tokenizer").save_pretrained(tmp_path / "clip")
    # The images are 16×16 already; without resizing (which goes through 8-bit PIL images) the expected values are
    # exact, and they check that images in [0, 1] are normalized, not rescaled by 1/255 a second time.
    CLIPImageProcessor(do_resize=False, do_center_crop=False).save_pretrained(tmp_path / "clip")
    vit = ViTForImageClassification(
        ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, num_labels=1)
    )  # fmt: skip
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(do_resize=False).save_pretrained(tmp_path / "vit")

    generate(pipeline_config(text_pipeline, tmp_path / "gen", text_prompts, num_samples=2))
    scored = score(
        ScoreConfig(reward_model=[str(tmp_path / "clip"), str(tmp_path / "vit")], input_dir=str(tmp_path / "gen"),
                    output_dir=str(tmp_path / "scored"))
    )  # fmt: skip
    images = np.array(scored["completion"], dtype=np.float32)  # [4, 16, 16, 3] in [0, 1]
    mean, std = np.array(CLIPImageProcessor().image_mean), np.array(CLIPImageProcessor().image_std)
    pixels = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2)).float()
    ids = AutoTokenizer.from_pretrained(tmp_path / "clip")(list(scored["prompt"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.get_text_features(**ids).pooler_output, dim=-1)
        image = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected_clip = clip.logit_scale.exp() * (text * image).sum(-1)
        vit_pixels = torch.from_numpy(((images - 0.5) / 0.5).transpose(0, 3, 1, 2)).float()
        expected_vit = vit(pixel_values=vit_pixels).logits[:, 0]
    np.testing.assert_allclose(scored["reward_clip"], expected_clip.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scored["reward_vit"], expected_vit.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scored["reward"], expected_clip.numpy() + expected_vit.numpy(), rtol=1e-4, atol=1e-5)
    gray = images[:, :, :, :1]  # a 1-channel pipeline's images go to an RGB model as three equal channels
    from rlfree.rewards.images import ImageRewardModel

    model = ImageRewardModel(str(tmp_path / "vit"))
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_allclose(model(["", "", "", ""], list(gray)), model(["", "", "", ""], list(rgb)), rtol=1e-6)
