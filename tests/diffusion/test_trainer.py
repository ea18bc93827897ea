"""The diffusion trainer: the weighted denoising loss, normalized per optimizer step, lands on the exact tilt; a
resumed run is the uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from rlfree.diffusion import toy
from rlfree.diffusion.layouts import read_layout
from rlfree.diffusion.layouts.base import to_images
from rlfree.diffusion.layouts.unet import UNetLayout
from rlfree.diffusion.pipeline import PIXEL_UNET, denoise, load_pipeline
from rlfree.errors import StageInputError
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import train
from rlfree.stages.weight import WeightConfig, weight
from rlfree.training import ModelConfig, RLFreeConfig
from tests.helpers import max_deviation, train_here, unet_weights

REWARD = "rlfree.diffusion.toy:plus_component_reward"
BRIGHTNESS = "tests.helpers:brightness"


def test_the_weighted_denoising_loss_is_normalized_per_optimizer_step(random_pipeline, tmp_path):
    """compute_loss = sum_i w_i·loss_i / (rows per optimizer step on one rank), weights rescaled to mean 1: the same
    noise and times give exactly the hand-computed value."""
    from datasets import Dataset

    from rlfree.diffusion.pipeline import denoising_loss
    from rlfree.diffusion.trainer import DiffusionTrainer
    from rlfree.seeds import stream_seed

    pipeline = load_pipeline(str(random_pipeline))
    samples = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    weights = [0.1, 0.3, 0.2, 0.2, 0.15, 0.05]
    data = Dataset.from_dict({"sample": samples.numpy().tolist(), "weight": weights, "prompt_index": [0] * 6})
    args = RLFreeConfig(output_dir=str(tmp_path), dataset_dir=str(tmp_path), per_device_train_batch_size=3,
                        gradient_accumulation_steps=2, report_to=[])  # fmt: skip
    trainer = DiffusionTrainer(pipeline, args, data, str(random_pipeline), layout=PIXEL_UNET)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(pipeline.unet, batch)
    # Each row's time and noise come from (seed, row, optimizer step) only.
    generators = [torch.Generator().manual_seed(stream_seed(args.seed, "denoise", row, 0)) for row in range(3)]
    per_sample = denoising_loss(pipeline.unet, pipeline.scheduler, samples[:3], None, generators)
    expected = (torch.tensor(weights[:3]) * 6 / sum(weights) * per_sample).sum() / (3 * 2)
    torch.testing.assert_close(loss, expected)


class UniformTimes(UNetLayout):
    """The toy's layout with Flux's training times (u uniform) in place of SD3's logit-normal ones."""

    flow_times = "uniform"


@pytest.mark.parametrize("prediction", ["noise", "velocity", "velocity-uniform-times"])
def test_weighted_denoising_loss_lands_on_the_exact_tilt_in_a_family_that_holds_it(prediction, tmp_path):
    """The trainer's objective, exactly: samples of pi_ref (the mixture with 30% on +) go through score and weight, and
    DiffusionTrainer fits the mixture's exact denoiser with a learnable + weight. The weighted denoising loss is
    minimized by the weighted data's own + share, and that is pi_ref's tilt p·e^(1/beta) / Z up to self-normalized
    sampling error: no UNet fit or sampler discretization stands between the loss and the target here. The same
    holds for the weighted flow-matching loss (`velocity`: SD3's and Flux's objective, x_t = (1 - s)·x0 + s·eps with
    SD3's logit-normal times, or Flux's uniform ones, target eps - x0) on the mixture's exact velocity field, and the
    fine-tuned flow model's own samples (Euler, 100 steps) hold the tilt's + share."""
    from types import SimpleNamespace

    from datasets import Dataset

    from rlfree.data import save_stage
    from rlfree.diffusion.trainer import DiffusionTrainer

    plus, beta, count = 0.3, 0.5, 4096
    samples = toy.mixture_samples(plus, count, torch.Generator().manual_seed(0))
    rows = {"prompt": [""] * count, "prompt_index": [0] * count, "sample_index": list(range(count))}
    generated = Dataset.from_dict(rows | {"sample": samples.numpy(), "completion": to_images(samples)})
    save_stage(generated, tmp_path / "gen", "generation", {"family": "diffusion"})
    score(ScoreConfig(reward=[REWARD], input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored")))
    weighted = weight(WeightConfig(str(tmp_path / "scored"), str(tmp_path / "weighted"), "rlhf", beta=beta))
    w, reward = np.array(weighted["weight"]), np.array(weighted["reward"])
    weighted_share, ess = (w * reward).sum() / w.sum(), w.sum() ** 2 / (w**2).sum()
    target = toy.tilted_plus_weight(plus, beta)
    sampling_sd = (target * (1 - target) / ess) ** 0.5
    assert abs(weighted_share - target) < 4 * sampling_sd

    if prediction == "noise":
        model, scheduler = toy.MixtureDenoiser(toy.scheduler(), [plus], learnable=True), toy.scheduler()
    else:
        model, scheduler = toy.MixtureVelocity([plus], learnable=True), toy.flow_scheduler()
    layout = UniformTimes(config={}, conditioning="none") if prediction.endswith("uniform-times") else PIXEL_UNET
    args = RLFreeConfig(output_dir=str(tmp_path / "fit"), dataset_dir=str(tmp_path / "weighted"), max_steps=400,
                        per_device_train_batch_size=128, gradient_accumulation_steps=2, learning_rate=0.05,
                        lr_scheduler_type="linear", save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10**6)  # fmt: skip
    DiffusionTrainer(
        SimpleNamespace(unet=model, scheduler=scheduler, components={}), args, weighted, "pi_ref", layout=layout
    ).train()
    fitted = model.plus_weights.item()
    print(f"+ weight: pi_ref {plus}, weighted data {weighted_share:.4f}, fitted {fitted:.4f}, exact tilt {target:.4f}")
    assert abs(fitted - weighted_share) < 0.02, (fitted, weighted_share)  # the optimizer's own noise: about 0.007
    assert abs(fitted - target) < 0.02 + 4 * sampling_sd
    if prediction != "noise":  # the tuned sampler itself: 2,000 Euler samples of the fitted velocity field
        drawn = toy.component(denoise(model.eval(), scheduler, list(range(2000)), None, 100)).mean()
        print(f"+ share of the fine-tuned flow sampler: {drawn:.4f}")
        assert abs(drawn - fitted) < 4 * (fitted * (1 - fitted) / 2000) ** 0.5


def test_weighted_training_of_a_text_to_image_unet(text_pipeline, text_prompts, sample_score_weight, tmp_path):
    """score → weight → train on a text-to-image pipeline: the loss conditions on the frozen text encoder's prompt
    embeddings (checked by hand), only the UNet moves, and the output loads as a StableDiffusionPipeline; LoRA on its
    attention layers trains too. CFG as soft best-of-N uses the empty prompt as the null condition."""
    from diffusers import StableDiffusionPipeline

    from rlfree.diffusion.pipeline import denoising_loss
    from rlfree.diffusion.trainer import DiffusionTrainer
    from rlfree.seeds import stream_seed
    from rlfree.stages.sample import SampleConfig, sample

    weighted = sample_score_weight(tmp_path, text_pipeline, text_prompts, BRIGHTNESS, 0.1, num_samples=4, num_inference_steps=2)  # fmt: skip
    assert np.allclose([sum(weighted.filter(lambda r, p=p: r["prompt_index"] == p)["weight"]) for p in (0, 1)], 1)

    pipeline = load_pipeline(str(text_pipeline))
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path / "weighted"),
                        per_device_train_batch_size=4, report_to=[])  # fmt: skip
    trainer = DiffusionTrainer(pipeline, args, weighted, str(text_pipeline), layout=read_layout(str(text_pipeline)))
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
        SampleConfig(str(text_pipeline), str(text_prompts), str(tmp_path / "cfg"), cfg_best_of_n=2, num_picks=2,
                     num_inference_steps=2, classifier_estimates=2)
    )  # fmt: skip
    classified = load_from_disk(str(tmp_path / "cfg" / "classified"))
    ratio = torch.tensor(classified["class_log_ratio"]).view(4, 2)
    expected = torch.softmax(ratio, 1)[torch.arange(4), torch.tensor(picked["sample_index"]) % 2]
    np.testing.assert_allclose(picked["pick_probability"], expected.numpy(), rtol=1e-5)
    with pytest.raises(StageInputError, match="empty prompt"):
        SampleConfig(str(text_pipeline), str(text_prompts), str(tmp_path / "e"), cfg_best_of_n=2, null_class=0)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(class_weighted, tmp_path):
    train_here(class_weighted, tmp_path / "whole", 8, 1, max_steps=4, save_strategy="no")
    train_here(class_weighted, tmp_path / "cut", 8, 1, max_steps=4, save_strategy="steps", save_steps=2)
    for name in ("model_index.json", "training.json", "unet/diffusion_pytorch_model.safetensors"):
        (tmp_path / "cut" / name).unlink()  # only what the resumed run writes is compared
    (tmp_path / "cut" / "checkpoint-4").rename(tmp_path / "later-checkpoint")  # as if killed after step 2
    train_here(class_weighted, tmp_path / "cut", 8, 1, max_steps=4, save_strategy="no", resume_from_checkpoint="last")
    whole, resumed = unet_weights(tmp_path / "whole"), unet_weights(tmp_path / "cut")
    assert max_deviation(whole, unet_weights(class_weighted / "base")) > 1e-3  # the steps moved the UNet
    assert max_deviation(whole, resumed) < 1e-6


def test_prompt_embeddings_are_computed_once_and_bounded(text_pipeline, text_prompts, monkeypatch, tmp_path):
    """The trainer embeds each prompt once (the text encoders are frozen) and reuses it: the batch's conditioning is
    what the text encoder gives for those prompts, whatever was cached; at most PROMPT_CACHE_SIZE prompts are kept."""
    from datasets import Dataset

    from rlfree.diffusion import trainer as trainer_module
    from rlfree.diffusion.trainer import DiffusionTrainer

    pipeline = load_pipeline(str(text_pipeline))
    layout = read_layout(str(text_pipeline))
    prompts = ["a bright square", "a dark circle", "a bright square", "a small circle"]
    data = Dataset.from_dict({"sample": np.zeros((4, 4, 8, 8), np.float32).tolist(), "weight": [0.25] * 4, "prompt": prompts})  # fmt: skip
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path), report_to=[])
    trainer = DiffusionTrainer(pipeline, args, data, str(text_pipeline), layout=layout)
    monkeypatch.setattr(trainer_module, "PROMPT_CACHE_SIZE", 2)
    calls = []
    encode = layout.condition
    monkeypatch.setattr(type(layout), "condition", lambda self, *a: calls.append(a[1]) or encode(*a))
    for order in (prompts, prompts[::-1], prompts[:2], prompts[2:]):
        condition = trainer.condition({"prompts": order}, torch.device("cpu"))
        expected = encode(pipeline, order, None, "cpu")["encoder_hidden_states"]
        torch.testing.assert_close(condition["encoder_hidden_states"], expected)
        assert len(trainer.embeddings) <= 2
    # Only the prompts not held are encoded, once each: all 3, then "a dark circle" (dropped as least recently used),
    # nothing (both held), then "a small circle" (dropped in the second batch).
    assert calls == [["a bright square", "a dark circle", "a small circle"], ["a dark circle"], ["a small circle"]]
