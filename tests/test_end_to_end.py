"""End to end: every CLI stage in a real subprocess, and exact convergence to pi* on the enumerable toy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree.toy.demo import DemoConfig, run_demo


def rlfree(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-m", "rlfree", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cli_pipeline(reference_dir, prompts_file, tmp_path):
    rlfree(
        "generate", "--model_name_or_path", reference_dir, "--prompts", prompts_file, "--num_samples", 8,
        "--max_new_tokens", 3, "--output_dir", "gen", "--seed", 1, "--batch_size", 16, cwd=tmp_path,
    )  # fmt: skip
    rlfree(
        "score",
        "--input_dir",
        "gen",
        "--reward",
        "rlfree.toy:arithmetic_reward",
        "--output_dir",
        "scored",
        cwd=tmp_path,
    )
    summary = rlfree(
        "weight",
        "--input_dir",
        "scored",
        "--weighting",
        "rlhf",
        "--beta",
        0.5,
        "--output_dir",
        "weighted",
        cwd=tmp_path,
    ).stdout
    assert "ESS min / median" in summary
    rlif = rlfree(
        "weight", "--input_dir", "gen", "--weighting", "rlif", "--beta_if", 0.5, "--rlif_length", 4,
        "--output_dir", "weighted_rlif", cwd=tmp_path,
    )  # fmt: skip
    assert "weighting rlif" in rlif.stdout
    (tmp_path / "recipe.yaml").write_text("train:\n  learning_rate: 0.01\n  max_steps: 3\n  report_to: none\n")
    rlfree(
        "train", "--config", "recipe.yaml", "--model_name_or_path", reference_dir, "--dataset_dir", "weighted",
        "--output_dir", "model", "--per_device_train_batch_size", 8, "--use_cpu", cwd=tmp_path,
    )  # fmt: skip

    weighted = load_from_disk(str(tmp_path / "weighted"))
    assert len(weighted) == 32
    assert {"reward", "weight", "log_weight", "ess", "kl_estimate"} <= set(weighted.column_names)
    for prompt in range(4):
        assert sum(w for w, p in zip(weighted["weight"], weighted["prompt_index"], strict=True) if p == prompt) == (
            pytest.approx(1.0)
        )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == 14
    assert "| beta | 0.5 |" in (tmp_path / "model" / "README.md").read_text()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("weighting", "temperature"), [("rlhf", 1.0), ("rlif", 1.0), ("rlhf", 0.7)], ids=["rlhf", "rlif", "rlhf-T0.7"]
)
def test_trained_model_reaches_the_exact_target(tmp_path, weighting, temperature):
    """KL(pi* || pi_theta) <= 0.1 KL(pi* || pi_ref), with pi* computed exactly over every possible completion.

    pi* is always built from pi_ref, so at temperature 0.7 only the weights' proposal correction can reach it.
    """
    config = DemoConfig(
        output_dir=str(tmp_path / weighting), weighting=weighting, beta=0.5, rlif_exponent=1.0, temperature=temperature
    )
    rows = run_demo(config)
    before = rows["pi_ref (before)"]["kl_from_target"]
    after = rows["rlfree (after)"]["kl_from_target"]
    print(
        f"{weighting} T={temperature}: KL(pi*||pi_ref)={before:.4f} KL(pi*||pi_theta)={after:.4f} "
        f"ratio={after / before:.3f}"
    )
    assert before > 0.1  # the target is really away from the reference
    assert after <= 0.1 * before
