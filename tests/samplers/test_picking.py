"""`pick_dataset`: one pick per group of candidates, with its probability."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from rlfree.samplers.picking import pick_dataset
from rlfree.weights import pick_log_weights


def test_pick_dataset_reports_softmax_probability_and_pick_index():
    rewards = [0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    scored = Dataset.from_dict(
        {
            "prompt_index": [0] * 6,
            "sample_index": list(range(6)),
            "reward": rewards,
            "ref_logprob": [-1.0] * 6,
            "proposal_logprob": [-1.0, -1.0, -1.0, -1.0, -1.0 + math.log(3.0), -1.0],
        }
    )
    correction = torch.tensor(scored["ref_logprob"]) - torch.tensor(scored["proposal_logprob"])
    group = torch.arange(6) // 3
    log_weight = pick_log_weights(torch.tensor(rewards, dtype=torch.float64), correction.double(), group, 2.0)
    picked = pick_dataset(scored, log_weight, num_candidates=3, num_picks=2, seed=0)
    assert picked["pick_index"] == [0, 1]
    first = torch.tensor(rewards[:3]).div(2.0).softmax(0)
    second = (torch.tensor(rewards[3:]) / 2.0 - torch.tensor([0.0, math.log(3.0), 0.0])).softmax(0)
    assert picked[0]["pick_probability"] == pytest.approx(first[picked[0]["sample_index"]].item())
    assert picked[1]["pick_probability"] == pytest.approx(second[picked[1]["sample_index"] - 3].item())
