"""Per-sample randomness (`rlfree.seeds`): seeds and uniforms are functions of their keys only."""

from __future__ import annotations

import numpy as np
import torch

from rlfree.seeds import pick_uniforms, sample_seed, stream_seed, uniforms
from rlfree.weights import pick
from tests.helpers import CHI2_CRITICAL, chi_square, replicated


def test_counter_based_pick_uniforms_give_softmax_picks():
    """The uniforms soft best-of-N and the samplers pick with: one per (seed, group key, candidate), no generator."""
    log_weight = [0.0, 1.0, 2.0, -0.5]
    values, group = replicated(log_weight, 20000)
    uniform = pick_uniforms(7, [(int(g), 0) for g in group], (torch.arange(len(values)) % 4).numpy())
    counts = torch.bincount(pick(values, group, uniform) % 4, minlength=4).double()
    assert chi_square(counts, torch.tensor(log_weight, dtype=torch.float64).softmax(0)) < CHI2_CRITICAL[3]


def test_a_sample_seed_is_a_function_of_seed_prompt_and_sample_only():
    """The same (seed, prompt, sample) gives the same 63-bit seed in any order of calls; any other key another seed,
    also where the keys' digits run together (prompt 1, sample 23 against prompt 12, sample 3)."""
    keys = [(seed, prompt, sample) for seed in (0, 1) for prompt in range(20) for sample in range(20)]
    seeds = [sample_seed(*key) for key in keys]
    assert [sample_seed(*key) for key in reversed(keys)] == seeds[::-1]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert sample_seed(0, 1, 23) != sample_seed(0, 12, 3)
    assert sample_seed(5, 2, 3) == stream_seed(5, 2, 3) != stream_seed(5, "2", 3, 0)


def test_uniforms_depend_on_their_own_row_and_position_only():
    """A batch's uniforms are each row's own: the same values one row at a time, in any batch, in (0, 1)."""
    sample_seeds = [sample_seed(42, prompt, sample) for prompt in range(50) for sample in range(200)]
    batch = uniforms(sample_seeds, 3)
    assert batch.dtype == torch.float64 and batch.shape == (len(sample_seeds),)
    assert torch.all((batch > 0) & (batch < 1))
    assert torch.equal(uniforms(sample_seeds[7:9], 3), batch[7:9])
    assert torch.equal(uniforms(sample_seeds[::-1], 3), batch.flip(0))
    positions = np.arange(len(sample_seeds)) % 5
    per_row = uniforms(sample_seeds, positions)
    assert torch.equal(per_row[positions == 3], batch[positions == 3])
    assert not torch.equal(uniforms(sample_seeds, 4), batch)
    # 10,000 uniforms: mean 1/2 and variance 1/12, each within 4 standard errors.
    assert abs(batch.mean().item() - 0.5) < 4 * (1 / 12 / len(batch)) ** 0.5
    assert abs(batch.var().item() - 1 / 12) < 4 * (1 / 180 / len(batch)) ** 0.5


def test_a_pick_uniform_does_not_depend_on_the_other_groups_picked_with_it():
    """Shards, processes and resumed runs pick different sets of groups in one call: each row's uniform is the same."""
    group_keys = [(prompt, pick_index) for prompt in range(6) for pick_index in range(3) for _ in range(4)]
    candidate = np.arange(len(group_keys)) % 4
    together = pick_uniforms(11, group_keys, candidate)
    alone = torch.cat([pick_uniforms(11, group_keys[i : i + 4], candidate[i : i + 4]) for i in range(0, 72, 4)])
    assert torch.equal(together, alone)
    assert not torch.equal(pick_uniforms(12, group_keys, candidate), together)
