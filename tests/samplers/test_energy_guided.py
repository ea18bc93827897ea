"""Energy-guided sampling (`rlfree sample --energy_guided`) against exact answers on the enumerable toy."""

from __future__ import annotations

import json

import pytest

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.lm.energy import EnergySearch
from rlfree.stages.sample import sample
from tests.helpers import exact_draw_tv, histogram, outcomes, total_variation

REWARD = "rlfree.toy:arithmetic_reward"
MAX_NEW_TOKENS = 3


@pytest.fixture
def energy_config(sample_config):
    """`energy_config(output_dir, **overrides)`: sample_config picking by the arithmetic reward at beta 0.5, batches
    of 4096, seed 0."""
    return lambda output_dir, **overrides: sample_config(
        output_dir, reward=[REWARD], **{"batch_size": 4096, "seed": 0, "beta": 0.5} | overrides
    )


def test_one_block_of_energy_guided_sampling_is_soft_best_of_m(tmp_path, energy_config):
    """A block as long as the completion: the energy is exp(r/beta) itself, and the picks are soft best-of-M's."""
    settings = {"num_picks": 6, "shard_size": 3}
    ets = sample(
        energy_config(
            tmp_path / "ets", energy_guided=True, block_size=MAX_NEW_TOKENS, num_candidates=4, num_rollouts=3,
            **settings,
        )
    )  # fmt: skip
    best_of_m = sample(energy_config(tmp_path / "bon", soft_best_of_n=4, **settings))
    assert ets["completion_ids"] == best_of_m["completion_ids"]
    assert ets["pick_probability"] == pytest.approx(best_of_m["pick_probability"])
    assert ets["reward"] == best_of_m["reward"]
    assert set(ets["cost_sequences"]) == {4}  # no rollouts: every candidate ends the completion


@pytest.mark.slow
def test_energy_guided_samples_approach_pi_star_as_candidates_and_rollouts_grow(exact_pair, energy_config, tmp_path):
    """Block size 1: three blocks per completion, each picked by estimated energy. TV to the exact pi* falls."""
    num_picks = 400
    target = toy.tilt(exact_pair["ref"], exact_pair["rewards"], 0.5).exp()
    tv = {}
    for m, k in [(2, 2), (8, 8)]:
        picked = sample(
            energy_config(
                tmp_path / f"ets-{m}-{k}", energy_guided=True, block_size=1, num_candidates=m, num_rollouts=k,
                num_picks=num_picks,
            )
        )  # fmt: skip
        tv[m, k] = [
            total_variation(histogram(outcomes(exact_pair, picked, p), target.shape[1]), target[p])
            for p in range(len(exact_pair["prompts"]))
        ]
        print(f"M={m} K={k}: TV to pi* per prompt {[round(value, 4) for value in tv[m, k]]}")
    bounds = [exact_draw_tv(target[p], num_picks) for p in range(len(exact_pair["prompts"]))]
    assert all(large <= bound for large, bound in zip(tv[8, 8], bounds, strict=True)), (tv, bounds)
    assert sum(tv[8, 8]) < 0.5 * sum(tv[2, 2])


def test_energy_guided_resumes_to_the_same_picks_and_reports_rollout_clipping(
    tuned_dir, tmp_path, monkeypatch, energy_config
):
    """ETS-IS with another rollout model, interrupted after two shards of one prompt and run again."""

    def config(output_dir):
        return energy_config(
            output_dir, energy_guided=True, block_size=1, num_candidates=2, num_rollouts=2,
            rollout_model=str(tuned_dir), rollout_log_ratio_clip=0.5, num_picks=2, shard_size=1,
        )  # fmt: skip

    original, calls = EnergySearch.run, []

    def run_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EnergySearch, "run", run_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sample(config(tmp_path / "out"))
    assert not (tmp_path / "out" / "picked").exists()
    assert len(list((tmp_path / "out" / "picked.partial").glob("shard-*"))) == 2
    monkeypatch.setattr(EnergySearch, "run", original)
    resumed = sample(config(tmp_path / "out"))
    uninterrupted = sample(config(tmp_path / "fresh"))
    assert resumed["completion_ids"] == uninterrupted["completion_ids"]
    sidecar = json.loads((tmp_path / "out" / "picked" / "sampling.json").read_text())
    assert 0 < sidecar["rollout_log_ratio_clipped"] <= 1  # a tight clip bites
    assert sidecar["cost"]["picks"] == len(resumed) == 8
    with pytest.raises(StageInputError, match="temperature 1"):
        energy_config(tmp_path / "x", energy_guided=True, temperature=0.7)
    with pytest.raises(StageInputError, match="--beta must be finite and > 0"):
        energy_config(tmp_path / "x", energy_guided=True, beta=0.0)
