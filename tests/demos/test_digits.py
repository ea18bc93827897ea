"""`rlfree demo --family diffusion` on the digits."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_the_digits_demo_runs_offline_and_adds_ink(tmp_path, monkeypatch):
    """`rlfree demo --family diffusion`, shrunk: every stage runs on the digits, and the fine-tuned pipeline's samples
    carry more ink than the base's (the reward it was weighted by)."""
    from rlfree.demos import DemoConfig, run_demo
    from rlfree.demos import digits as demo

    for name, value in {"BASE_STEPS": 150, "SAMPLES_PER_DIGIT": 8, "INFERENCE_STEPS": 10, "TUNE_STEPS": 100}.items():
        monkeypatch.setattr(demo, name, value)
    figures = run_demo(DemoConfig(output_dir=str(tmp_path), family="diffusion"))
    assert figures["rlfree (after)"]["mean_ink"] > figures["base (before)"]["mean_ink"] + 0.02, figures
    assert figures["pi* (estimate)"]["mean_ink"] > figures["base (before)"]["mean_ink"]
    for path in ("digits.png", "results.json", "after/grids/prompt-9.png", "model/model_index.json"):
        assert (tmp_path / path).stat().st_size > 0
