"""Per-sample randomness: a sample depends on (seed, prompt index, sample index) only, never on batching.

Shared by every family. `sample_seed` seeds an engine's per-request generator (vLLM) and a diffusion sample's noise.
`uniforms` is the HF backend's counter-based noise: one
uniform per (sample, position), computed for a whole batch at once from the samples' seeds, with no generator state
to carry between steps and nothing shared between rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one stream of randomness named by `keys`, stable across processes and runs (unlike `hash`)."""
    digest = hashlib.blake2b(":".join(str(key) for key in (seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample."""
    return stream_seed(seed, prompt_index, sample_index)


def pick_uniforms(seed: int, group_keys: list[tuple], candidate: np.ndarray | list[int]) -> torch.Tensor:
    """One uniform per candidate row of a pick: a function of (seed, the row's group key, its candidate number) only.

    So a pick does not depend on which other groups are picked in the same call (shards, processes, resumes).
    """
    return uniforms([stream_seed(seed, "pick", *key) for key in group_keys], np.asarray(candidate))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping arithmetic is defined for numpy unsigned integers)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def uniforms(sample_seeds: list[int] | np.ndarray, position: int | np.ndarray) -> torch.Tensor:
    """One float64 uniform in (0, 1) per sample for step `position` (one for all, or one each): a pure function of
    (seed, position).

    53 random bits per value, as numpy's own doubles; the half-step offset keeps 0 out, so an inverse-CDF draw never
    lands on a token of probability 0.
    """
    keys = np.asarray(sample_seeds, dtype=np.uint64)
    with np.errstate(over="ignore"):
        positions = np.broadcast_to(np.asarray(position, dtype=np.int64).astype(np.uint64), keys.shape)
        bits = _splitmix64(keys ^ _splitmix64(positions))
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53))
