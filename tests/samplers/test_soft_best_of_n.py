"""Soft best-of-N picks with probability softmax(r/beta + log pi_ref - log p) and converges to pi* on the toy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.stages.sample import SampleConfig, sample

REWARD = "rlfree.toy:arithmetic_reward"
PLUS_REWARD = "rlfree.diffusion.toy:plus_component_reward"


@pytest.fixture
def soft_config(sample_config):
    """`soft_config(output_dir, **overrides)`: sample_config picking by the arithmetic reward, batches of 512, seed 0."""
    return lambda output_dir, **overrides: sample_config(
        output_dir, reward=[REWARD], **{"batch_size": 512, "seed": 0} | overrides
    )


@pytest.fixture(scope="module")
def exact(reference_dir, prompts_file) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log pi_ref and reward of every possible completion of each prompt (enumerated once per module)."""
    model = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    distributions = toy.exact_distributions(model, tokenizer, prompts, max_new_tokens=3)
    return distributions["logprobs"], distributions["rewards"]


def _soft_bon_accuracy(p: torch.Tensor, n: int, beta: float) -> torch.Tensor:
    """Exact accuracy of soft best-of-n with a 0/1 reward: E_K[K e^(1/beta) / (K e^(1/beta) + n - K)], K ~ Bin(n, p)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_binomial = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    pmf = (log_binomial + k * p[:, None].log() + (n - k) * torch.log1p(-p[:, None])).exp()
    boost = math.exp(1 / beta)
    return (pmf * k * boost / (k * boost + n - k)).sum(-1)


def test_soft_best_of_n_converges_to_the_exact_tilted_accuracy(exact, tmp_path, soft_config):
    n, beta, picks = 32, 0.5, 256
    ref_logprobs, rewards = exact
    correct = (rewards == 1).double()
    p = (ref_logprobs.exp() * correct).sum(-1)
    star = (toy.tilt(ref_logprobs, rewards, beta).exp() * correct).sum(-1)
    expected = _soft_bon_accuracy(p, n, beta)
    # The finite-N bias is small at N = 32 and shrinks towards pi* (checked exactly, no sampling involved).
    assert torch.all(expected < star) and torch.all(star - expected < 0.015)
    assert torch.all(_soft_bon_accuracy(p, 4 * n, beta) > expected)

    picked = sample(soft_config(tmp_path, soft_best_of_n=n, beta=beta, num_picks=picks))
    accuracy = torch.tensor(picked["reward"], dtype=torch.float64).view(len(p), picks).mean(-1)
    # Every pick uses its own N fresh candidates, so picks are i.i.d. Bernoulli(expected): 4 sigma per prompt.
    sigma = (expected * (1 - expected) / picks).sqrt()
    assert torch.all((accuracy - expected).abs() < 4 * sigma), (accuracy, expected, star)
    assert torch.all(accuracy > p + 0.2), (accuracy, p)
    mean_sigma = sigma.pow(2).sum().sqrt() / len(p)
    assert abs(accuracy.mean() - star.mean()) < 4 * mean_sigma + (star - expected).mean()


def test_hard_best_of_n_matches_one_minus_miss_probability(exact, tmp_path, soft_config):
    n, picks = 2, 512
    ref_logprobs, rewards = exact
    p = (ref_logprobs.exp() * (rewards == 1).double()).sum(-1)
    expected = 1 - (1 - p) ** n
    picked = sample(soft_config(tmp_path, soft_best_of_n=n, beta=0.0, num_picks=picks))
    accuracy = torch.tensor(picked["reward"], dtype=torch.float64).view(len(p), picks).mean(-1)
    sigma = (expected * (1 - expected) / picks).sqrt()
    assert torch.all((accuracy - expected).abs() < 4 * sigma), (accuracy, expected)


def test_output_layout_sidecars_and_determinism(tmp_path, soft_config):
    config = soft_config(tmp_path / "a", soft_best_of_n=4, beta=1.0, num_picks=3)
    picked = sample(config)
    candidates = load_from_disk(str(tmp_path / "a" / "candidates"))
    scored = load_from_disk(str(tmp_path / "a" / "scored"))
    assert len(candidates) == 4 * 3 * 4 and len(picked) == 4 * 3
    costs = {"cost_sequences", "cost_tokens", "cost_model_tokens", "cost_reward_calls"}
    assert set(picked.column_names) == set(scored.column_names) | {"pick_index", "pick_probability"} | costs
    for row in picked:
        group = [c for c in candidates if c["prompt_index"] == row["prompt_index"] and c["sample_index"] // 4 == row["pick_index"]]  # fmt: skip
        assert row["cost_sequences"] == row["cost_reward_calls"] == len(group) == 4
        assert row["cost_tokens"] == sum(c["num_tokens"] for c in group) == row["cost_model_tokens"] // 2
    assert {"reward", "ref_logprob", "proposal_logprob", "answer"} <= set(picked.column_names)
    assert picked["pick_index"] == [0, 1, 2] * 4
    assert [s // 4 for s in picked["sample_index"]] == picked["pick_index"]
    assert all(0 < q <= 1 for q in picked["pick_probability"])
    on_disk = load_from_disk(str(tmp_path / "a" / "picked"))
    assert on_disk.to_list() == picked.to_list()
    sidecar = json.loads((tmp_path / "a" / "picked" / "sampling.json").read_text())
    assert sidecar["soft_best_of_n"] == 4 and sidecar["beta"] == 1.0 and sidecar["reward"] == [REWARD]
    assert sidecar["sampler"] == "soft_best_of_n" and sidecar["cost"]["total"]["tokens"] == sum(picked["cost_tokens"])
    assert sidecar["family"] == "lm"
    for carried in ("generation.json", "scoring.json"):
        assert (tmp_path / "a" / "picked" / carried).is_file()

    again = sample(soft_config(tmp_path / "b", soft_best_of_n=4, beta=1.0, num_picks=3))
    assert again.to_list() == picked.to_list()


def test_soft_best_of_n_and_evaluate_skip_long_prompts_too(reference_dir, long_prompts_file, sample_config, tmp_path):
    from rlfree.evaluation.evaluate import EvaluateConfig, evaluate

    config = sample_config(
        tmp_path / "bon",
        prompts=long_prompts_file,
        reward=[REWARD],
        soft_best_of_n=4,
        num_picks=2,
        long_prompts="skip",
    )
    picked = sample(config)
    assert sorted(picked["prompt_index"]) == [0, 0, 2, 2] and sorted(picked["pick_index"]) == [0, 0, 1, 1]
    common = {"model_name_or_path": str(reference_dir), "prompts": str(long_prompts_file), "reward": [REWARD]}
    report = evaluate(
        EvaluateConfig(
            **common, output_dir=str(tmp_path / "eval"), num_samples=4, max_new_tokens=3, long_prompts="skip"
        )
    )
    assert report["num_prompts"] == 2


def test_soft_best_of_n_picks_follow_their_weights(random_pipeline, tmp_path):
    """`rlfree sample --soft_best_of_n` on a pipeline: each pick's probability is softmax(r/beta) over its N
    candidates, and the + frequency of the picks matches the mean of those probabilities (pick noise only)."""
    from rlfree.stages.sample import sample

    n, beta, picks = 4, 0.5, 300
    picked = sample(
        SampleConfig(
            str(random_pipeline), None, str(tmp_path / "soft"), soft_best_of_n=n, beta=beta, reward=[PLUS_REWARD],
            num_picks=picks, num_inference_steps=2, batch_size=256,
        )
    )  # fmt: skip
    candidates = load_from_disk(str(tmp_path / "soft" / "scored"))
    reward = np.array(candidates["reward"]).reshape(picks, n)  # one prompt: groups of N in sample order
    weights = np.exp(reward / beta) / np.exp(reward / beta).sum(1, keepdims=True)
    expected_plus = (weights * reward).sum(1)
    plus = np.array(picked["reward"])
    assert 0.05 < reward.mean() < 0.95  # both components among the candidates: the picks have a choice
    np.testing.assert_allclose(picked["pick_probability"], weights[np.arange(picks), np.array(picked["sample_index"]) % n], rtol=1e-6)  # fmt: skip
    stderr = np.sqrt((expected_plus * (1 - expected_plus)).sum()) / picks
    assert abs(plus.mean() - expected_plus.mean()) < 4 * stderr, (plus.mean(), expected_plus.mean(), stderr)
    assert plus.mean() > reward.mean() + 0.1  # the picks lean to the rewarded component
    cost = json.loads((tmp_path / "soft" / "picked" / "sampling.json").read_text())["cost"]["per_pick"]
    assert cost == {"sequences": n, "tokens": 2 * n, "model_tokens": 2 * n, "reward_calls": n}
    with pytest.raises(StageInputError, match="language models"):
        SampleConfig(str(random_pipeline), None, str(tmp_path / "e"), energy_guided=True, reward=[PLUS_REWARD])
