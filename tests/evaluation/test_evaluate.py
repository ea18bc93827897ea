"""Evaluation and A/B statistics, checked against exact enumeration on the toy task."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.evaluation.evaluate import ABConfig, EvaluateConfig, ab, bootstrap_means, estimate, evaluate, win_rates
from rlfree.evaluation.tables import format_number
from rlfree.stages.sample import SampleConfig, sample

REWARD = ["rlfree.toy:arithmetic_reward"]
PLUS_REWARD = "rlfree.diffusion.toy:plus_component_reward"
MAX_NEW_TOKENS = 3  # two answer digits + EOS: every completion is enumerable
NUM_PROMPTS, K = 8, 64

# The samples are seeded, so each check passes or fails for good: test at 99.9% so that a correct estimator fails on
# about one seed in a thousand, not one in twenty, while a biased one (off by a few standard errors) still fails.
CONFIDENCE, NUM_BOOTSTRAP = 0.999, 4000


@pytest.fixture(scope="module")
def model_a_dir(save_toy_model):
    """A more accurate toy model than pi_ref (trained on 90% correct answers), saved like a checkpoint."""
    return save_toy_model("model_a", seed=0, correct_fraction=0.9)


@pytest.fixture(scope="module")
def eval_prompts(write_toy_prompts):
    path, rows = write_toy_prompts(NUM_PROMPTS, seed=3)
    return path, [row["prompt"] for row in rows]


@pytest.fixture(scope="module")
def exact(model_a_dir, reference_dir, eval_prompts):
    """Exact per-prompt accuracy of A and pi_ref, and exact KL(A || pi_ref), by enumerating every completion."""
    tokenizer = toy.build_tokenizer()
    result = {}
    for name, path in (("a", model_a_dir), ("ref", reference_dir)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        result[name] = toy.exact_distributions(model, tokenizer, eval_prompts[1], MAX_NEW_TOKENS)
    accuracy = {name: (d["logprobs"].exp() * d["rewards"]).sum(-1).numpy() for name, d in result.items()}
    kl = toy.kl(result["a"]["logprobs"], result["ref"]["logprobs"]).numpy()
    return accuracy, kl


def test_win_rates_count_pairs_and_ties():
    a = np.array([[1.0, 0.0], [2.0, 2.0]])
    b = np.array([[1.0, 1.0, 0.0], [3.0, 1.0, 2.0]])
    # prompt 0: a=1 vs (1,1,0) -> .5+.5+1; a=0 vs (1,1,0) -> 0+0+.5  => 2.5/6
    # prompt 1: a=2 vs (3,1,2) -> 0+1+.5, twice                        => 3/6
    np.testing.assert_allclose(win_rates(a, b), [2.5 / 6, 0.5])
    np.testing.assert_allclose(win_rates(b, a), 1 - win_rates(a, b).reshape(-1))


def test_bootstrap_is_seeded_and_percentile():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    first, again = estimate("x", values, 0.9, 500, seed=7), estimate("x", values, 0.9, 500, seed=7)
    assert first == again
    assert first != estimate("x", values, 0.9, 500, seed=8)
    assert first["x"] == 1.5
    means = bootstrap_means(values, 500, seed=7)
    assert first["x_ci"] == pytest.approx(list(np.percentile(means, [5, 95])))
    assert first["x_stderr"] == pytest.approx(means.std())
    # one prompt: every resample is that prompt
    assert estimate("y", np.array([0.25]), 0.95, 10, seed=0)["y_ci"] == [0.25, 0.25]


def test_kl_needs_temperature_one(reference_dir, prompts_file, tmp_path):
    with pytest.raises(StageInputError, match="temperature"):
        EvaluateConfig(
            str(reference_dir),
            str(prompts_file),
            str(tmp_path),
            reward=REWARD,
            ref_model=str(reference_dir),
            temperature=0.7,
        )
    with pytest.raises(StageInputError, match="reward"):
        EvaluateConfig(str(reference_dir), str(prompts_file), str(tmp_path))


def test_evaluate_matches_exact_accuracy_and_kl(model_a_dir, reference_dir, eval_prompts, exact, tmp_path):
    accuracy, kl = exact
    config = EvaluateConfig(
        model_name_or_path=str(model_a_dir),
        prompts=str(eval_prompts[0]),
        output_dir=str(tmp_path / "eval"),
        reward=REWARD,
        ref_model=str(reference_dir),
        num_samples=K,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=1,
        confidence=CONFIDENCE,
        num_bootstrap=NUM_BOOTSTRAP,
    )
    report = evaluate(config)
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text()) == report
    assert (tmp_path / "eval" / "samples").is_dir() and (tmp_path / "eval" / "scored").is_dir()
    low, high = report["mean_reward_ci"]
    assert low <= accuracy["a"].mean() <= high
    low, high = report["kl_k1_ci"]
    assert low <= kl.mean() <= high, (report["kl_k1"], kl.mean())
    assert abs(report["kl_k3"] - kl.mean()) < 4 * report["kl_k3_stderr"] + 1e-9
    assert report["kl_k3_ci"][0] >= 0
    assert sum(report["finish_reasons"].values()) == pytest.approx(1.0)
    assert 1 <= report["num_tokens"]["mean"] <= MAX_NEW_TOKENS

    no_ref = evaluate(
        EvaluateConfig(
            str(model_a_dir),
            str(eval_prompts[0]),
            str(tmp_path / "no_ref"),
            reward=REWARD,
            num_samples=2,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    )
    assert not any(key.startswith("kl") for key in no_ref)


def test_ab_win_rate_matches_exact(model_a_dir, reference_dir, eval_prompts, exact, tmp_path):
    accuracy, kl = exact
    p_a, p_b = accuracy["a"], accuracy["ref"]
    exact_win = float(np.mean(p_a * (1 - p_b) + 0.5 * (p_a * p_b + (1 - p_a) * (1 - p_b))))
    config = ABConfig(
        model_a=str(model_a_dir),
        model_b=str(reference_dir),
        prompts=str(eval_prompts[0]),
        output_dir=str(tmp_path / "ab"),
        reward=REWARD,
        ref_model=str(reference_dir),
        num_samples=K,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=5,
        confidence=CONFIDENCE,
        num_bootstrap=NUM_BOOTSTRAP,
    )
    result = ab(config)
    low, high = result["win_rate_a_ci"]
    assert low <= exact_win <= high, (result["win_rate_a"], exact_win)
    assert abs(result["win_rate_a"] - exact_win) < 4 * result["win_rate_a_stderr"]
    assert result["win_rate_a"] > 0.5  # A is the more accurate model
    assert result["num_prompts"] == NUM_PROMPTS and result["num_samples"] == K
    assert result["mean_reward_a"] > result["mean_reward_b"]
    # B is pi_ref itself: both estimators of KL(B || pi_ref) are exactly 0
    assert result["kl_b"]["k1"] == pytest.approx(0, abs=1e-5) and result["kl_b"]["k3"] == pytest.approx(0, abs=1e-5)
    assert result["kl_a"]["k1_ci"][0] <= kl.mean() <= result["kl_a"]["k1_ci"][1]
    for name in ("ab.json", "ab.md", "ab.png"):
        assert (tmp_path / "ab" / name).stat().st_size > 0
    assert json.loads((tmp_path / "ab" / "ab.json").read_text())["win_rate_a"] == result["win_rate_a"]
    assert "Win rate of A" in (tmp_path / "ab" / "ab.md").read_text()
    # The first completion of each side on the first three prompts, with its reward, as the sides' datasets hold them.
    sides = {name: load_from_disk(str(tmp_path / "ab" / name / "scored")) for name in ("a", "b")}
    assert [example["prompt_index"] for example in result["examples"]] == [0, 1, 2]
    for example in result["examples"]:
        for name, dataset in sides.items():
            (row,) = [r for r in dataset if r["prompt_index"] == example["prompt_index"] and r["sample_index"] == 0]
            assert (example[name], example[f"reward_{name}"]) == (row["completion"], row["reward"])
            assert example["prompt"] == row["prompt"]
    assert (
        f"- A (reward {format_number(result['examples'][0]['reward_a'])}): `"
        in (tmp_path / "ab" / "ab.md").read_text()
    )


def soft_best_of_n_accuracy(accuracy: np.ndarray, n: int, beta: float) -> np.ndarray:
    """Exact per-prompt accuracy of a soft best-of-N pick under a 0/1 reward: with j of the N candidates right, the
    pick is right with probability j·e^(1/beta) / (j·e^(1/beta) + N − j)."""
    j = np.arange(n + 1)
    right = j * np.exp(1 / beta) / (j * np.exp(1 / beta) + n - j)
    binomial = np.array([math.comb(n, k) for k in j]) * accuracy[:, None] ** j * (1 - accuracy[:, None]) ** (n - j)
    return (binomial * right).sum(-1)


def test_a_sampler_is_a_contestant(
    model_a_dir, reference_dir, eval_prompts, exact, write_toy_prompts, tmp_path, sample_config
):
    """`rlfree sample`'s output folder stands in for a model: its picks are scored with the comparison's reward
    (accuracy and win rate against their exact values), its cost comes from its sidecar, and it has no KL."""
    accuracy, _ = exact
    n, beta = 4, 0.5
    config = sample_config(
        tmp_path / "soft", prompts=eval_prompts[0], soft_best_of_n=n, beta=beta, reward=REWARD, num_picks=K, seed=2
    )
    sample(config)
    picks_accuracy = soft_best_of_n_accuracy(accuracy["ref"], n, beta)
    assert picks_accuracy.mean() > accuracy["ref"].mean() + 0.1  # the sampler is visibly better than pi_ref
    shared = {
        "prompts": str(eval_prompts[0]),
        "reward": REWARD,
        "ref_model": str(reference_dir),
        "num_samples": K,
        "max_new_tokens": MAX_NEW_TOKENS,
        "confidence": CONFIDENCE,
        "num_bootstrap": NUM_BOOTSTRAP,
    }
    report = evaluate(
        EvaluateConfig(model_name_or_path=str(tmp_path / "soft"), output_dir=str(tmp_path / "e"), **shared)
    )
    low, high = report["mean_reward_ci"]
    assert low <= picks_accuracy.mean() <= high, (report["mean_reward"], picks_accuracy.mean())
    assert not any(key.startswith("kl") for key in report)  # a pick's probability under the sampler is unknown
    assert report["sampler"].startswith(f"soft_best_of_n N={n} beta={beta}")
    assert report["cost_per_sample"]["sequences"] == n and report["cost_per_sample"]["reward_calls"] == n
    assert not (tmp_path / "e" / "samples").exists()  # nothing sampled again

    result = ab(ABConfig(model_a=str(tmp_path / "soft" / "picked"), model_b=str(model_a_dir), output_dir=str(tmp_path / "ab"), seed=5, **shared))  # fmt: skip
    p_a, p_b = picks_accuracy, accuracy["a"]
    exact_win = float(np.mean(p_a * (1 - p_b) + 0.5 * (p_a * p_b + (1 - p_a) * (1 - p_b))))
    low, high = result["win_rate_a_ci"]
    assert low <= exact_win <= high, (result["win_rate_a"], exact_win)
    assert "kl_a" not in result["a"] and set(result["kl_b"]) >= {"k1", "k3"}
    markdown = (tmp_path / "ab" / "ab.md").read_text()
    assert "n/a" in markdown and "soft_best_of_n" in markdown and "model-token passes" in markdown

    other_prompts, _ = write_toy_prompts(NUM_PROMPTS, seed=4)
    with pytest.raises(StageInputError, match="holds picks for --prompts"):
        evaluate(EvaluateConfig(**shared | {"prompts": str(other_prompts)}, model_name_or_path=str(tmp_path / "soft"), output_dir=str(tmp_path / "x")))  # fmt: skip


def test_a_sampler_folder_accepts_a_byte_identical_copy_of_its_prompts(prompts_file, tmp_path):
    from rlfree.evaluation.evaluate import EvaluateConfig, check_sampler_prompts
    from rlfree.sources import content_fingerprint

    copy = tmp_path / "copy.jsonl"
    shutil.copy(prompts_file, copy)
    fingerprint = content_fingerprint(str(prompts_file))
    settings = {"prompts": str(prompts_file), "prompts_split": "train", "prompts_fingerprint": fingerprint}
    config = EvaluateConfig(str(tmp_path), str(copy), str(tmp_path / "eval"), reward=REWARD)
    check_sampler_prompts(tmp_path, settings, config)
    copy.write_text(copy.read_text() + json.dumps({"prompt": "9 + 9 ="}) + "\n")
    with pytest.raises(StageInputError, match="holds picks for --prompts"):
        check_sampler_prompts(tmp_path, settings, config)


def test_evaluate_and_ab_take_pipelines_and_their_samplers(random_pipeline, reference_dir, tmp_path):
    """`evaluate` and `ab` on diffusion contestants: an unconditional pipeline needs no --prompts, a sample costs its
    denoising steps, there is no KL; a soft best-of-N sampler over the pipeline is a contestant like any other, and
    its picks beat the pipeline's own samples on the reward they were picked by."""
    from rlfree.evaluation.evaluate import ABConfig, EvaluateConfig, ab, evaluate, win_rates
    from rlfree.stages.sample import sample

    settings = {"reward": [PLUS_REWARD], "num_inference_steps": 2, "num_bootstrap": 200}
    report = evaluate(EvaluateConfig(str(random_pipeline), None, str(tmp_path / "eval"), num_samples=64, **settings))
    scored = load_from_disk(str(tmp_path / "eval" / "scored"))
    assert report["mean_reward"] == pytest.approx(np.mean(scored["reward"]))
    assert report["cost_per_sample"] == {"sequences": 1.0, "tokens": 2.0, "model_tokens": 2.0, "reward_calls": 0.0}
    assert "kl_k1" not in report and "num_tokens" not in report
    # One prompt: the interval resamples the samples, independent draws of an unconditional pipeline.
    assert report["interval"].endswith("over samples (one prompt)")
    assert report["mean_reward_ci"][0] < report["mean_reward"] < report["mean_reward_ci"][1]
    with pytest.raises(StageInputError, match="likelihoods"):
        EvaluateConfig(str(random_pipeline), None, str(tmp_path / "kl"), ref_model=str(random_pipeline), **settings)

    sample(SampleConfig(str(random_pipeline), None, str(tmp_path / "soft"), soft_best_of_n=4, beta=0.1,
                        reward=[PLUS_REWARD], num_picks=64, num_inference_steps=2))  # fmt: skip
    result = ab(ABConfig(str(tmp_path / "soft"), str(random_pipeline), None, str(tmp_path / "ab"), num_samples=64, **settings))  # fmt: skip
    rewards = [np.array(load_from_disk(str(tmp_path / "ab" / side / "scored"))["reward"]).reshape(1, -1) for side in "ab"]  # fmt: skip
    assert result["win_rate_a"] == pytest.approx(win_rates(*rewards).mean())
    assert result["win_rate_a_ci"][0] < result["win_rate_a"] < result["win_rate_a_ci"][1]
    assert result["mean_reward_a"] > result["mean_reward_b"] + 0.1 and result["win_rate_a"] > 0.5
    assert result["a"]["cost_per_sample"]["sequences"] == 4 and "soft_best_of_n N=4" in result["a"]["sampler"]
    with pytest.raises(StageInputError, match="two of a kind"):
        ABConfig(str(random_pipeline), str(reference_dir), None, str(tmp_path / "mixed"), **settings)
