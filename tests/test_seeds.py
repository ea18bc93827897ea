"""Per-sample randomness (`rlfree.seeds`): seeds and uniforms are functions of their keys only."""

from __future__ import annotations

import torch

from rlfree.seeds import pick_uniforms
from rlfree.weights import pick
from tests.helpers import (
    CHI2_CRITICAL,
    chi_square,
    replicated,
)


def test_counter_based_pick_uniforms_give_softmax_picks():
    """The uniforms soft best-of-N and the samplers pick with: one per (seed, group key, candidate), no generator."""
    log_weight = [0.0, 1.0, 2.0, -0.5]
    values, group = replicated(log_weight, 20000)
    uniform = pick_uniforms(7, [(int(g), 0) for g in group], (torch.arange(len(values)) % 4).numpy())
    counts = torch.bincount(pick(values, group, uniform) % 4, minlength=4).double()
    assert chi_square(counts, torch.tensor(log_weight, dtype=torch.float64).softmax(0)) < CHI2_CRITICAL[3]
