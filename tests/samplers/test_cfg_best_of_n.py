"""Classifier-free guidance as soft best-of-N (`rlfree sample --cfg_best_of_n`) on a class-conditional pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from rlfree.diffusion.pipeline import load_pipeline
from rlfree.errors import StageInputError

REWARD = "rlfree.diffusion.toy:plus_component_reward"


def test_cfg_best_of_n_stage_picks_by_the_pipelines_own_classifier(class_pipeline, random_pipeline, tmp_path):
    """`rlfree sample --cfg_best_of_n N --null_class K` on a class-conditional pipeline: every candidate carries the
    estimate of log p(c|x) - log p(c) computed with its own (t, eps) draws whatever the batch, each pick's probability
    is softmax(w·estimate) over its N candidates, and the cost counts the estimate's UNet passes."""
    from rlfree.diffusion.classifier import class_log_ratio
    from rlfree.seeds import stream_seed
    from rlfree.stages.sample import SampleConfig, sample

    prompts = tmp_path / "classes.jsonl"
    prompts.write_text('{"prompt": "0"}\n')
    n, picks, scale, estimates = 3, 5, 2.0, 4
    settings = {"cfg_best_of_n": n, "null_class": 1, "num_picks": picks, "num_inference_steps": 2}
    picked = sample(
        SampleConfig(str(class_pipeline), str(prompts), str(tmp_path / "cfg"), cfg_scale=scale,
                     classifier_estimates=estimates, batch_size=4, **settings)
    )  # fmt: skip
    classified = load_from_disk(str(tmp_path / "cfg" / "classified")).with_format("torch")[:]
    pipeline = load_pipeline(str(class_pipeline))
    seeds = [stream_seed(42, "classifier", 0, s) for s in classified["sample_index"].tolist()]
    labels = classified["class_label"]
    again, _ = class_log_ratio(pipeline.unet, pipeline.scheduler, classified["sample"], {"class_labels": labels}, {"class_labels": torch.ones_like(labels)}, seeds, estimates)  # fmt: skip
    torch.testing.assert_close(
        classified["class_log_ratio"].double(), again, rtol=1e-4, atol=1e-5
    )  # batch of 15, not 4
    assert (classified["class_log_ratio_stderr"] > 0).all()
    log_weight = scale * classified["class_log_ratio"].double().view(picks, n)
    probability = torch.softmax(log_weight, 1)[torch.arange(picks), torch.tensor(picked["sample_index"]) % n]
    np.testing.assert_allclose(picked["pick_probability"], probability.numpy(), rtol=1e-6)
    sidecar = json.loads((tmp_path / "cfg" / "picked" / "sampling.json").read_text())
    assert sidecar["cost"]["per_pick"] == {"sequences": n, "tokens": 2 * n, "model_tokens": 2 * n + 2 * estimates * n, "reward_calls": 0}  # fmt: skip
    classifier = json.loads((tmp_path / "cfg" / "picked" / "classifying.json").read_text())["classifier"]
    assert classifier["unet_passes_per_sample"] == 2 * estimates and classifier["mean_stderr"] > 0
    with pytest.raises(StageInputError, match="--null_class"):
        SampleConfig(str(class_pipeline), str(prompts), str(tmp_path / "e"), cfg_best_of_n=n)
    with pytest.raises(StageInputError, match="unconditional"):
        SampleConfig(str(random_pipeline), None, str(tmp_path / "e"), cfg_best_of_n=n, null_class=0)
    with pytest.raises(StageInputError, match="also a prompt's condition"):
        sample(SampleConfig(str(class_pipeline), str(prompts), str(tmp_path / "same"), **settings | {"null_class": 0}))
    with pytest.raises(StageInputError, match="not a reward"):
        SampleConfig(str(class_pipeline), str(prompts), str(tmp_path / "e"), reward=[REWARD], **settings)
