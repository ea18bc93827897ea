"""Shared fixtures: a tiny reference model trained once per session, saved like a Hub checkpoint."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    """The toy pi_ref saved with save_pretrained, so every stage loads it through from_pretrained."""
    from rlfree import toy

    model, tokenizer = toy.build_reference_model(seed=0)
    path = tmp_path_factory.mktemp("reference")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """Four addition prompts (with an `answer` column that must reach the reward as a kwarg)."""
    from rlfree import toy

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in toy.make_prompts(4, seed=1)))
    return path
