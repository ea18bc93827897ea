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
