"""Today's pipeline layouts (SDXL, SD3, Flux; and Stable Diffusion's, through the same seam) on tiny local pipelines:
the stages draw each pipeline's own images, train its denoiser with LoRA, and guide it (RLG beside CFG)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from rlfree.diffusion.layouts import read_layout
from rlfree.diffusion.pipeline import denoising_loss, load_pipeline
from rlfree.errors import StageInputError
from rlfree.seeds import sample_seed, stream_seed
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.train import train
from rlfree.training import ModelConfig, RLFreeConfig
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


def flow_loss_by_hand(layout, pipeline, samples, prompts, rows, seed: int, logit_normal: bool) -> torch.Tensor:
    """The per-sample flow-matching loss written out: noise, then u from each row's generator (logit-normal for SD3,
    uniform for Flux), the training sigma u picks, x_t = (1 - s)·x0 + s·noise, target noise - x0."""
    from rlfree.diffusion.pipeline import noise_scheduler

    scheduler = noise_scheduler(pipeline.scheduler)
    condition = layout.condition(pipeline, prompts, None, "cpu")
    losses = []
    for position, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        generator = torch.Generator().manual_seed(stream_seed(seed, "denoise", row, 0))
        noise = torch.randn(sample.shape, generator=generator)
        u = torch.sigmoid(torch.randn(1, generator=generator)) if logit_normal else torch.rand(1, generator=generator)
        index = int(u * 1000)
        sigma = scheduler.sigmas[index]
        noisy = ((1 - sigma) * sample + sigma * noise)[None]
        one = {key: value[position : position + 1] for key, value in condition.items()}
        with torch.no_grad():
            prediction = layout.predict(layout.network(pipeline), noisy, scheduler.timesteps[index : index + 1], one)
        losses.append((prediction[0] - (noise - sample)).pow(2).mean())
    return torch.stack(losses)


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_weighted_lora_training_and_rlg_with_cfg_on_each_layout(
    kind, tiny_pipeline, text_prompts, sample_score_weight, tmp_path
):
    """generate → score → weight → train --use_peft → sample (RLG with and without CFG, soft best-of-N, CFG as soft
    best-of-N) → ab on SDXL, SD3 and Flux. The flow-matching loss is the one written out by hand; LoRA trains the
    denoiser's attention and feed-forward layers only, and the output loads as the pipeline's own class; RLG's W = 0
    and W = 1 draw, seed for seed, the base's and the tuned pipeline's own CFG-guided samples, from one denoiser with
    the adapter switched off and on (and, without CFG, W = 0 the base's plain samples)."""
    from rlfree.diffusion.trainer import DiffusionTrainer
    from rlfree.evaluation.evaluate import ABConfig, ab
    from rlfree.stages.sample import SampleConfig, sample

    base = tiny_pipeline(kind)
    layout = read_layout(str(base))
    weighted = sample_score_weight(tmp_path, base, text_prompts, BRIGHTNESS, 0.1, num_samples=4, **TINY)
    pipeline = load_pipeline(str(base))
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path / "weighted"),
                        per_device_train_batch_size=4, report_to=[])  # fmt: skip
    trainer = DiffusionTrainer(pipeline, args, weighted, str(base), layout=layout)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(layout.network(pipeline), batch)
    if kind == "sdxl":
        condition = layout.condition(pipeline, batch["prompts"], None, "cpu")
        generators = [torch.Generator().manual_seed(stream_seed(args.seed, "denoise", row, 0)) for row in range(4)]
        samples = batch["samples"]
        per_sample = denoising_loss(pipeline.unet, trainer.noise_scheduler, samples, condition, generators, layout)
    else:
        per_sample = flow_loss_by_hand(
            layout, pipeline, batch["samples"], batch["prompts"], batch["rows"], args.seed, logit_normal=kind == "sd3"
        )
    torch.testing.assert_close(loss, (batch["weight"] * per_sample).sum() / 4, rtol=1e-5, atol=1e-6)

    train(
        ModelConfig(model_name_or_path=str(base), use_peft=True, lora_r=4),
        RLFreeConfig(output_dir=str(tmp_path / "lora"), dataset_dir=str(tmp_path / "weighted"), max_steps=2,
                     per_device_train_batch_size=4, learning_rate=5e-2, report_to=[], disable_tqdm=True),
    )  # fmt: skip
    tuned = load_pipeline(str(tmp_path / "lora"))
    assert type(tuned).__name__ == PIPELINES[kind]
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and name != layout.denoiser:
            assert all(
                torch.equal(a, b)
                for a, b in zip(component.parameters(), getattr(tuned, name).parameters(), strict=True)
            )
    pairs = zip(layout.network(pipeline).parameters(), layout.network(tuned).parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    if kind == "sd3":  # full fine-tuning: every transformer weight trains
        train(
            ModelConfig(model_name_or_path=str(base)),
            RLFreeConfig(output_dir=str(tmp_path / "full"), dataset_dir=str(tmp_path / "weighted"), max_steps=1,
                         per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], disable_tqdm=True),
        )  # fmt: skip
        full = layout.network(load_pipeline(str(tmp_path / "full")))
        assert not (tmp_path / "full" / layout.adapter_dir).exists()
        pairs = zip(layout.network(pipeline).named_parameters(), full.parameters(), strict=True)
        still = {name for (name, a), b in pairs if torch.equal(a, b)}
        # All but the text tokens' queries in the last block, whose text outputs the model drops (no gradient).
        assert still == {"transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.attn.add_q_proj.bias"}
    adapter = tmp_path / "lora" / layout.adapter_dir / "adapter_config.json"
    targets = json.loads(adapter.read_text())["target_modules"]
    if kind == "sdxl":
        assert {"to_q", "to_k", "to_v"} <= {name.rsplit(".", 1)[-1] for name in targets}
    else:  # attention and feed-forward, not the adaLN modulations or the embedders
        assert any(".attn." in name for name in targets) and any(
            ".ff." in name or "proj_mlp" in name for name in targets
        )
        assert not any("norm" in name or "embed" in name for name in targets)

    cfg = {"cfg_guidance_scale": 3.0, "num_picks": 2, **TINY}
    own = {}
    for name, folder in (("base", base), ("tuned", tmp_path / "lora")):
        own[name] = generate(GenerateConfig(str(folder), str(text_prompts), str(tmp_path / f"own_{name}"), num_samples=2,
                                            cfg_guidance_scale=3.0, **TINY)).with_format("numpy")[:]["sample"]  # fmt: skip
    for scale, expected, atol in ((0.0, own["base"], 1e-6), (1.0, own["tuned"], 1e-4)):
        rlg = sample(SampleConfig(str(tmp_path / "lora"), str(text_prompts), str(tmp_path / f"rlg{scale}"),
                                  guidance_scale=scale, ref_model=str(base), **cfg))  # fmt: skip
        drawn = load_from_disk(str(tmp_path / f"rlg{scale}" / "candidates")).with_format("numpy")[:]["sample"]
        np.testing.assert_allclose(drawn, expected, atol=atol)
        assert len(rlg) == 4
    assert np.abs(own["base"] - own["tuned"]).max() > 1e-3  # the two ends differ: W chooses between them
    # Without CFG, W = 0 draws the base's plain samples: those `generate` drew for the weights (sample indices 0, 1).
    sample(SampleConfig(str(tmp_path / "lora"), str(text_prompts), str(tmp_path / "rlg_plain"), guidance_scale=0.0,
                        ref_model=str(base), num_picks=2, **TINY))  # fmt: skip
    plain = load_from_disk(str(tmp_path / "rlg_plain" / "candidates")).with_format("numpy")[:]["sample"]
    generated = load_from_disk(str(tmp_path / "gen")).with_format("numpy")[:]
    np.testing.assert_allclose(plain, generated["sample"][generated["sample_index"] < 2], atol=1e-6)

    soft = sample(SampleConfig(str(base), str(text_prompts), str(tmp_path / "soft"), soft_best_of_n=2, beta=0.1,
                               reward=[BRIGHTNESS], **cfg))  # fmt: skip
    classified = sample(SampleConfig(str(base), str(text_prompts), str(tmp_path / "cfg"), cfg_best_of_n=2,
                                     classifier_estimates=2, **cfg))  # fmt: skip
    assert len(soft) == len(classified) == 4
    assert np.isfinite(load_from_disk(str(tmp_path / "cfg" / "classified"))["class_log_ratio"]).all()
    result = ab(ABConfig(str(tmp_path / "lora"), str(base), str(text_prompts), str(tmp_path / "ab"), num_samples=4,
                         reward=[BRIGHTNESS], num_bootstrap=50, **TINY))  # fmt: skip
    assert 0 <= result["win_rate_a"] <= 1 and result["a"]["cost_per_sample"]["sequences"] == 1


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_other_resolutions_and_shifts_follow_the_pipeline(
    kind, tiny_pipeline, text_prompts, pipeline_config, tmp_path
):
    """At 32 pixels (other latent sizes: SDXL's size ids, Flux's token-count shift) and, for SD3, with the scheduler's
    resolution-dependent shift switched on (`use_dynamic_shifting`), `generate` still draws the pipeline's own images."""
    import shutil

    folder = tmp_path / kind
    shutil.copytree(tiny_pipeline(kind), folder)
    if kind == "sd3":
        config_file = folder / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_dynamic_shifting": True}))
    settings = {"num_samples": 1, "num_inference_steps": 3, "seed": 7, "resolution": 32}
    drawn = generate(pipeline_config(folder, tmp_path / "gen", text_prompts, **settings)).with_format("numpy")[:]
    assert drawn["sample"].shape == (2, 4, 16, 16) and drawn["completion"].shape == (2, 32, 32, 3)
    pipeline = load_pipeline(str(folder))
    assert pipeline.scheduler.config.get("use_dynamic_shifting", False) == (kind in ("sd3", "flux"))
    generator = torch.Generator().manual_seed(sample_seed(7, 1, 0))
    guidance = {} if kind == "flux" else {"guidance_scale": 1.0}
    own = pipeline(TEXT_PROMPTS[1], generator=[generator], num_inference_steps=3, height=32, width=32, output_type="np", **guidance)  # fmt: skip
    np.testing.assert_allclose(drawn["completion"][1], own.images[0], atol=1e-5)
