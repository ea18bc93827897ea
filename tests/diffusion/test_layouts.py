"""Today's pipeline layouts (SDXL, SD3, Flux; and Stable Diffusion's, through the same seam) on tiny local pipelines:
the stages draw each pipeline's own images, train its denoiser with LoRA, and guide it (RLG beside CFG)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlfree.diffusion.layouts import read_layout
from rlfree.diffusion.pipeline import load_pipeline
from rlfree.errors import StageInputError
from rlfree.seeds import sample_seed
from rlfree.stages.generate import GenerateConfig, generate
from tests.helpers import TEXT_PROMPTS

BRIGHTNESS = "tests.helpers:brightness"
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
TINY = {"num_inference_steps": 2, "resolution": 16}


def own_images(pipeline, kind: str, prompt: str, seed: int, steps: int, cfg: float) -> np.ndarray:
    """The pipeline's own `__call__` for one prompt and generator, at the tiny pipelines' 16 pixels."""
    generator = torch.Generator().manual_seed(seed)
    # Flux: CFG with a negative prompt is `true_cfg_scale`; its `guidance_scale` is the embedded (distilled) guidance.
    guidance = {"true_cfg_scale": cfg, "negative_prompt": ""} if kind == "flux" else {"guidance_scale": cfg}
    output = pipeline(
        prompt, generator=[generator], num_inference_steps=steps, height=16, width=16, output_type="np", **guidance
    )
    return output.images[0]


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_generate_draws_each_pipelines_own_images(kind, tiny_pipeline, text_prompts, pipeline_config, tmp_path):
    """`generate` on each layout stores the latents its denoiser made and, as completions, the very images the
    pipeline's own `__call__` returns for the same per-sample generator, with classifier-free guidance
    (--cfg_guidance_scale, the empty prompt as negative); the batch size changes nothing."""
    folder = tiny_pipeline(kind)
    layout = read_layout(str(folder))
    assert type(layout).pipelines == (PIPELINES[kind],) or kind == "sd"
    settings = {"num_samples": 2, "num_inference_steps": 3, "cfg_guidance_scale": 4.0, "seed": 5, "resolution": 16}
    one = generate(pipeline_config(folder, tmp_path / "one", text_prompts, batch_size=4, **settings))
    other = generate(pipeline_config(folder, tmp_path / "two", text_prompts, batch_size=1, **settings))
    one, other = one.with_format("numpy")[:], other.with_format("numpy")[:]
    assert one["sample"].shape == (4, 4, 8, 8) and one["completion"].shape == (4, 16, 16, 3)
    # To rounding, relative to the latents' scale: the tiny SD pipeline's random UNet drives them past 1e3.
    assert np.abs(one["sample"] - other["sample"]).max() <= 1e-5 * np.abs(one["sample"]).max()
    pipeline = load_pipeline(str(folder))
    assert type(pipeline).__name__ == PIPELINES[kind]
    for row in (0, 3):
        prompt, index = int(one["prompt_index"][row]), int(one["sample_index"][row])
        own = own_images(pipeline, kind, TEXT_PROMPTS[prompt], sample_seed(5, prompt, index), 3, 4.0)
        np.testing.assert_allclose(one["completion"][row], own, atol=1e-5)
    assert np.abs(one["completion"][0] - one["completion"][1]).max() > 1e-3  # two samples of one prompt differ


def test_layouts_refuse_what_they_cannot_drive(tiny_pipeline, text_prompts, reference_dir, random_pipeline, tmp_path):
    sd3, sdxl, flux = (tiny_pipeline(kind) for kind in ("sd3", "sdxl", "flux"))
    index = json.loads((sd3 / "model_index.json").read_text())
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(StageInputError, match=r"PixArtSigmaPipeline; rlfree supports SD3 .*Flux .*SDXL .*UNet"):
        read_layout(str(other))
    index = json.loads((sdxl / "model_index.json").read_text())
    for name in ("text_encoder_2", "tokenizer_2"):
        index.pop(name)
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline"}))
    (other / "unet").mkdir()
    (other / "unet" / "config.json").write_text((sdxl / "unet" / "config.json").read_text())
    (other / "vae").mkdir()
    (other / "vae" / "config.json").write_text((sdxl / "vae" / "config.json").read_text())
    with pytest.raises(StageInputError, match="extra conditioning .*addition_embed_type"):
        read_layout(str(other))
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(StageInputError, match=r"lacks \['text_encoder_2', 'tokenizer_2'\]"):
        read_layout(str(other))
    cases = [
        ({"model_name_or_path": flux, "resolution": 10}, "multiples of 4"),
        ({"model_name_or_path": sd3, "guidance_scale": 2.0, "cfg_guidance_scale": 2.0}, "give one"),
        ({"model_name_or_path": random_pipeline, "prompts": None, "cfg_guidance_scale": 2.0}, "text-to-image"),
        ({"model_name_or_path": reference_dir, "resolution": 16}, "--resolution: for diffusion pipelines"),
        ({"model_name_or_path": sd3, "ref_model": flux, "guidance_scale": 1.0}, "different transformer architectures"),
    ]
    for settings, message in cases:
        config = {"prompts": str(text_prompts), "output_dir": str(tmp_path / "out")} | settings
        with pytest.raises(StageInputError, match=message):
            generate(GenerateConfig(**{key: value and str(value) if key.endswith(("path", "model")) else value
                                       for key, value in config.items()}))  # fmt: skip
