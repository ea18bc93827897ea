"""Text-to-image pipelines (StableDiffusionPipeline's layout: VAE latents, CLIP text encoder): the same stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from rlfree.diffusion import toy
from rlfree.diffusion.pipeline import load_pipeline
from rlfree.errors import StageInputError
from rlfree.lm.trainer import RLFreeConfig
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import ModelConfig, train
from rlfree.stages.weight import WeightConfig, weight

PROMPTS = ["a bright square", "a dark circle"]


def brightness(prompts: list, completions: list, **kwargs) -> list[float]:
    return [float(np.mean(image)) for image in completions]


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_pipeline")
    toy.build_text_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    return path


def test_samples_are_latents_and_images_are_the_pipelines_own(text_pipeline, prompts, tmp_path):
    """`sample` is the latent the UNet denoised, `completion` the image StableDiffusionPipeline itself returns for the
    same seed, with classifier-free guidance (--guidance_scale without --ref_model); any batch size gives the same."""
    from diffusers import StableDiffusionPipeline

    from rlfree.seeds import sample_seed

    settings = {"num_samples": 3, "num_inference_steps": 3, "guidance_scale": 4.0, "seed": 5}
    one = generate(GenerateConfig(str(text_pipeline), str(prompts), str(tmp_path / "one"), batch_size=6, **settings))
    other = generate(GenerateConfig(str(text_pipeline), str(prompts), str(tmp_path / "two"), batch_size=2, **settings))
    one, other = one.with_format("numpy")[:], other.with_format("numpy")[:]
    assert one["sample"].shape == (6, 4, 8, 8) and one["completion"].shape == (6, 16, 16, 3)
    np.testing.assert_allclose(one["sample"], other["sample"], atol=1e-5)
    pipeline = StableDiffusionPipeline.from_pretrained(text_pipeline)
    for row in (0, 4):
        prompt, index = int(one["prompt_index"][row]), int(one["sample_index"][row])
        generator = torch.Generator().manual_seed(sample_seed(5, prompt, index))
        own = pipeline(PROMPTS[prompt], generator=[generator], num_inference_steps=3, guidance_scale=4.0, output_type="np")  # fmt: skip
        np.testing.assert_allclose(one["completion"][row], own.images[0], atol=1e-5)
    with pytest.raises(StageInputError, match="give --prompts"):
        generate(GenerateConfig(str(text_pipeline), None, str(tmp_path / "none"), num_inference_steps=2))


def test_weighted_training_of_a_text_to_image_unet(text_pipeline, prompts, tmp_path):
    """score → weight → train on a text-to-image pipeline: the loss conditions on the frozen text encoder's prompt
    embeddings (checked by hand), only the UNet moves, and the output loads as a StableDiffusionPipeline; LoRA on its
    attention layers trains too. CFG as soft best-of-N uses the empty prompt as the null condition."""
    from diffusers import StableDiffusionPipeline

    from rlfree.diffusion.pipeline import denoising_loss
    from rlfree.diffusion.trainer import DiffusionTrainer
    from rlfree.seeds import stream_seed
    from rlfree.stages.sample import SampleConfig, sample

    generate(GenerateConfig(str(text_pipeline), str(prompts), str(tmp_path / "gen"), num_samples=4, num_inference_steps=2))  # fmt: skip
    score(ScoreConfig(reward=["tests.test_diffusion_text:brightness"], input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored")))  # fmt: skip
    weighted = weight(WeightConfig(str(tmp_path / "scored"), str(tmp_path / "weighted"), "rlhf", beta=0.1))
    assert np.allclose([sum(weighted.filter(lambda r, p=p: r["prompt_index"] == p)["weight"]) for p in (0, 1)], 1)

    pipeline = load_pipeline(str(text_pipeline))
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path / "weighted"),
                        per_device_train_batch_size=4, report_to=[])  # fmt: skip
    trainer = DiffusionTrainer(pipeline, args, weighted, str(text_pipeline))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(pipeline.unet, batch)
    embeddings = pipeline.encode_prompt([weighted[i]["prompt"] for i in range(4)], "cpu", 1, False)[0]
    generators = [torch.Generator().manual_seed(stream_seed(args.seed, "denoise", row, 0)) for row in range(4)]
    per_sample = denoising_loss(pipeline.unet, pipeline.scheduler, batch["samples"], {"encoder_hidden_states": embeddings}, generators)  # fmt: skip
    expected = (batch["weight"] * per_sample).sum() / 4
    torch.testing.assert_close(loss, expected)

    for name, peft in (("full", False), ("lora", True)):
        train(
            ModelConfig(model_name_or_path=str(text_pipeline), use_peft=peft),
            RLFreeConfig(output_dir=str(tmp_path / name), dataset_dir=str(tmp_path / "weighted"), max_steps=2,
                         per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], disable_tqdm=True),
        )  # fmt: skip
        tuned = StableDiffusionPipeline.from_pretrained(tmp_path / name)
        for component in ("text_encoder", "vae"):
            for a, b in zip(getattr(tuned, component).parameters(), getattr(pipeline, component).parameters(), strict=True):  # fmt: skip
                assert torch.equal(a, b), component
        assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), pipeline.unet.parameters(), strict=True))  # fmt: skip
    adapter = json.loads((tmp_path / "lora" / "unet_lora" / "adapter_config.json").read_text())
    assert {"to_q", "to_k", "to_v"} <= {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}

    picked = sample(
        SampleConfig(str(text_pipeline), str(prompts), str(tmp_path / "cfg"), cfg_best_of_n=2, num_picks=2,
                     num_inference_steps=2, classifier_estimates=2)
    )  # fmt: skip
    classified = load_from_disk(str(tmp_path / "cfg" / "classified"))
    ratio = torch.tensor(classified["class_log_ratio"]).view(4, 2)
    expected = torch.softmax(ratio, 1)[torch.arange(4), torch.tensor(picked["sample_index"]) % 2]
    np.testing.assert_allclose(picked["pick_probability"], expected.numpy(), rtol=1e-5)
    with pytest.raises(StageInputError, match="empty prompt"):
        SampleConfig(str(text_pipeline), str(prompts), str(tmp_path / "e"), cfg_best_of_n=2, null_class=0)


def test_image_reward_models_score_the_images(text_pipeline, prompts, tmp_path):
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
            text_config={"vocab_size": len(toy.TEXT_WORDS), "hidden_size": 16, "intermediate_size": 32,
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

    generate(GenerateConfig(str(text_pipeline), str(prompts), str(tmp_path / "gen"), num_samples=2, num_inference_steps=2))  # fmt: skip
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


def test_training_noise_follows_the_forward_process_whatever_the_sampler(text_pipeline, prompts, tmp_path):
    """A pipeline whose scheduler is a sampler with its own units (Euler: x + sigma·eps) trains on the DDPM forward
    process of the same betas, as diffusers' training scripts do, not on the sampler's add_noise."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from rlfree.diffusion.trainer import DiffusionTrainer

    generate(GenerateConfig(str(text_pipeline), str(prompts), str(tmp_path / "gen"), num_samples=2, num_inference_steps=2))  # fmt: skip
    score(ScoreConfig(reward=["tests.test_diffusion_text:brightness"], input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored")))  # fmt: skip
    weighted = weight(WeightConfig(str(tmp_path / "scored"), str(tmp_path / "weighted"), "rlhf", beta=0.1))
    pipeline = load_pipeline(str(text_pipeline))
    ddim_alphas = pipeline.scheduler.alphas_cumprod
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path / "weighted"), report_to=[])
    trainer = DiffusionTrainer(pipeline, args, weighted, str(text_pipeline))
    assert isinstance(trainer.noise_scheduler, DDPMScheduler)
    torch.testing.assert_close(trainer.noise_scheduler.alphas_cumprod, ddim_alphas)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.isfinite(trainer.compute_loss(pipeline.unet, batch))
