"""Sampling a diffusers pipeline: samples depend on (seed, prompt, index) only, prompts are class labels or text,
and images are the pipeline's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlfree.diffusion.layouts.base import to_images
from rlfree.diffusion.pipeline import denoise, load_pipeline
from rlfree.errors import StageInputError
from rlfree.stages.generate import generate
from tests.helpers import TEXT_PROMPTS


def test_samples_depend_on_seed_prompt_and_index_only(random_pipeline, pipeline_config, tmp_path):
    """The same dataset for any batch and shard size; `completion` is the image `DDPMPipeline` would return."""
    settings = {"num_samples": 12, "num_inference_steps": 4, "seed": 7}
    one = generate(pipeline_config(random_pipeline, tmp_path / "one", batch_size=12, **settings))
    other = generate(pipeline_config(random_pipeline, tmp_path / "other", batch_size=5, shard_size=7, **settings))
    one, other = one.with_format("numpy")[:], other.with_format("numpy")[:]
    np.testing.assert_allclose(one["sample"], other["sample"], atol=1e-5)
    assert one["sample"].shape == (12, 1, 4, 4) and one["completion"].shape == (12, 4, 4, 1)
    expected = to_images(torch.from_numpy(one["sample"]))
    np.testing.assert_allclose(one["completion"], expected, atol=1e-6)
    assert one["completion"].min() >= 0 and one["completion"].max() <= 1
    assert set(one["prompt_index"].tolist()) == {0} and sorted(one["sample_index"].tolist()) == list(range(12))
    assert (tmp_path / "one" / "grids" / "prompt-0.png").stat().st_size > 0
    assert json.loads((tmp_path / "one" / "generation.json").read_text())["family"] == "diffusion"
    # The stage's loop is the pipeline's own reverse process: the same first sample through DDPMPipeline itself.
    pipeline = load_pipeline(str(random_pipeline))
    again = denoise(pipeline.unet, pipeline.scheduler, [123], None, 4)
    generator = torch.Generator().manual_seed(123)
    through_pipeline = pipeline(batch_size=1, generator=generator, num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(to_images(again), through_pipeline, atol=1e-5)


def test_prompts_are_class_labels_of_a_class_conditional_unet(
    class_pipeline, random_pipeline, pipeline_config, tmp_path
):
    prompts = tmp_path / "classes.jsonl"
    prompts.write_text('{"prompt": "1", "note": "a"}\n{"prompt": "0", "note": "b"}\n')
    dataset = generate(pipeline_config(class_pipeline, tmp_path / "out", prompts, num_samples=3))
    assert dataset["class_label"] == [1, 1, 1, 0, 0, 0] and dataset["prompt"][0] == "1"
    assert dataset["note"] == ["a"] * 3 + ["b"] * 3  # extra prompt columns travel along, to the rewards
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2"}\n')
    with pytest.raises(StageInputError, match="not a class label"):
        generate(pipeline_config(class_pipeline, tmp_path / "bad", bad))
    with pytest.raises(StageInputError, match="give --prompts"):
        generate(pipeline_config(class_pipeline, tmp_path / "none"))
    with pytest.raises(StageInputError, match="unconditional pipeline"):
        generate(pipeline_config(random_pipeline, tmp_path / "uncond", prompts))
    with pytest.raises(StageInputError, match="--temperature"):
        generate(pipeline_config(random_pipeline, tmp_path / "t", temperature=0.7))


def test_samples_are_latents_and_images_are_the_pipelines_own(text_pipeline, text_prompts, pipeline_config, tmp_path):
    """`sample` is the latent the UNet denoised, `completion` the image StableDiffusionPipeline itself returns for the
    same seed, with classifier-free guidance (--guidance_scale without --ref_model); any batch size gives the same."""
    from diffusers import StableDiffusionPipeline

    from rlfree.seeds import sample_seed

    settings = {"num_samples": 3, "num_inference_steps": 3, "guidance_scale": 4.0, "seed": 5}
    one = generate(pipeline_config(text_pipeline, tmp_path / "one", text_prompts, batch_size=6, **settings))
    other = generate(pipeline_config(text_pipeline, tmp_path / "two", text_prompts, batch_size=2, **settings))
    one, other = one.with_format("numpy")[:], other.with_format("numpy")[:]
    assert one["sample"].shape == (6, 4, 8, 8) and one["completion"].shape == (6, 16, 16, 3)
    np.testing.assert_allclose(one["sample"], other["sample"], atol=1e-5)
    pipeline = StableDiffusionPipeline.from_pretrained(text_pipeline)
    for row in (0, 4):
        prompt, index = int(one["prompt_index"][row]), int(one["sample_index"][row])
        generator = torch.Generator().manual_seed(sample_seed(5, prompt, index))
        own = pipeline(TEXT_PROMPTS[prompt], generator=[generator], num_inference_steps=3, guidance_scale=4.0, output_type="np")  # fmt: skip
        np.testing.assert_allclose(one["completion"][row], own.images[0], atol=1e-5)
    with pytest.raises(StageInputError, match="give --prompts"):
        generate(pipeline_config(text_pipeline, tmp_path / "none"))
