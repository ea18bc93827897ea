"""The model-family registry: a Hub id selects the diffusion family when its repository is a diffusers pipeline."""

from __future__ import annotations

import numpy as np

from rlfree.stages.generate import generate


def test_a_pipeline_named_by_its_hub_id_is_found_and_loaded(random_pipeline, pipeline_config, tmp_path, monkeypatch):
    """A Hub id selects the diffusion family when its repository has model_index.json: read here from a Hub cache
    laid out as huggingface_hub writes it (offline, as the tests run), through the same calls that fetch from the Hub."""
    import shutil

    import huggingface_hub.constants

    from rlfree.family import family_of_model

    snapshot = tmp_path / "hub" / "models--my-org--tiny-ddpm" / "snapshots" / ("0" * 40)
    shutil.copytree(random_pipeline, snapshot)
    (tmp_path / "hub" / "models--my-org--tiny-ddpm" / "refs").mkdir()
    (tmp_path / "hub" / "models--my-org--tiny-ddpm" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert family_of_model("my-org/tiny-ddpm").name == "diffusion"
    assert family_of_model("my-org/not-cached").name == "lm"
    settings = {"num_samples": 3, "num_inference_steps": 2}
    from_hub = generate(pipeline_config("my-org/tiny-ddpm", tmp_path / "hub-gen", **settings))
    local = generate(pipeline_config(random_pipeline, tmp_path / "local-gen", **settings))
    np.testing.assert_allclose(np.array(from_hub["sample"]), np.array(local["sample"]), atol=1e-6)


def test_the_registry_resolves_a_model_its_data_and_a_name(reference_dir, random_pipeline, generated, tmp_path):
    """A pipeline folder is the diffusion family and anything else the catch-all LM family; a stage folder's family is
    the one its generation record names, else (an older record) its model's, else (no record) the catch-all's."""
    import json

    import pytest

    from rlfree.data import save_stage
    from rlfree.errors import StageInputError
    from rlfree.family import FAMILIES, family_named, family_of_data, family_of_model

    assert family_of_model(str(random_pipeline)).name == "diffusion"
    assert family_of_model(str(reference_dir)).name == "lm"
    assert family_named("lm") is family_of_model(str(reference_dir))  # one object per family
    assert family_of_data(generated).name == "lm"
    older = tmp_path / "older"
    save_stage(__import__("datasets").Dataset.from_dict({"prompt": ["p"]}), older, "generation",
               {"model_name_or_path": str(random_pipeline)})  # fmt: skip
    assert "family" not in json.loads((older / "generation.json").read_text())
    assert family_of_data(older).name == "diffusion"
    assert family_of_data(tmp_path).name == list(FAMILIES)[-1] == "lm"
    with pytest.raises(StageInputError, match="unknown model family 'gan'"):
        family_named("gan")


def test_every_stage_records_the_family(generated, scored, weighted, random_pipeline, pipeline_config, tmp_path):
    """generation.json, scoring.json and weighting.json name the family they ran for (an LM, a pipeline)."""
    import json

    from rlfree.stages.score import ScoreConfig, score
    from rlfree.stages.weight import WeightConfig, weight

    for folder, stage in ((generated, "generation"), (scored, "scoring"), (weighted, "weighting")):
        assert json.loads((folder / f"{stage}.json").read_text())["family"] == "lm", stage
    generate(pipeline_config(random_pipeline, tmp_path / "gen", num_samples=2))
    score(ScoreConfig(input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored"), reward=[IMAGE_REWARD]))
    weight(WeightConfig(str(tmp_path / "scored"), str(tmp_path / "weighted"), "rlhf", beta=1.0))
    for stage in ("generation", "scoring", "weighting"):
        assert json.loads((tmp_path / "weighted" / f"{stage}.json").read_text())["family"] == "diffusion", stage


IMAGE_REWARD = "rlfree.diffusion.toy:plus_component_reward"


def test_training_records_the_family(reference_dir, weighted, tmp_path):
    import json

    from rlfree.stages.train import train
    from rlfree.training import ModelConfig

    from .helpers import training_args

    train(ModelConfig(model_name_or_path=str(reference_dir)), training_args(tmp_path, weighted, max_steps=1))
    assert json.loads((tmp_path / "out" / "training.json").read_text())["family"] == "lm"
