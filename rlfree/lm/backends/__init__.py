"""Sampling backends: one seam for "draw completions for (prompt, sample index, seed)".

A backend only draws. A backend that knows the log-probability of the distribution it actually sampled from (its
temperature/top-k/top-p, its kernels, its dtype) reports it per token, and the weights then correct exactly for every
difference between engine and trainer; a backend that does not (None) gets it teacher-forced. Log pi_ref comes from the
teacher-forced computation the trainer maximizes (`rlfree.lm.generation`), unless the backend sampled with that very
computation: the HF backend's sampling pass over the stage's own float32 model at temperature 1 gives the model's
log-softmax up to KV-cache rounding (`model_token_logprobs`). Samples depend only on (seed, prompt index, sample index),
never on batching.

A new backend is one module here plus one entry in `rlfree.options.BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ...options import BACKENDS

if TYPE_CHECKING:
    from ...options import SamplerOptions


@dataclass
class BackendModel:
    """The model a backend samples from: where it is, and the transformers copy the stage already loads.

    The HF backend samples with `load()` (the same weights the teacher-forced pass reads); an engine loads `path`
    itself.
    """

    path: str
    dtype: str
    trust_remote_code: bool
    load: Callable[[], Any]


@dataclass
class Draw:
    """One sampled completion, as the backend produced it."""

    prompt_index: int
    sample_index: int
    completion_ids: list[int]  # ends with the EOS id when finish_reason == "stop"
    finish_reason: str  # "stop" (an EOS was sampled) or "length" (cut at max_new_tokens)
    proposal_token_logprobs: list[float] | None = None  # the engine's own log p of each token; None: teacher-forced
    # The sampled model's own log-softmax at each token, from the sampling pass (the HF backend, temperature 1, no
    # top-k/top-p, float32): the teacher-forced value up to KV-cache rounding. None where it was not computed.
    model_token_logprobs: list[float] | None = None


class SamplingBackend(Protocol):
    """What the stages call; `close` frees the engine (and its processes), also after an error."""

    name: str

    def draw(
        self, prompt_ids: dict[int, list[int]], num_samples: int, seed: int, max_new_tokens: int | None = None
    ) -> list[Draw]:
        """`num_samples` completions for every prompt (keyed by prompt index), in (prompt, sample) order, each of at
        most `max_new_tokens` (default: the sampler's `--max_new_tokens`)."""

    def close(self) -> None: ...


def load_backend(model: BackendModel, sampler: SamplerOptions, eos_token_ids: list[int]) -> SamplingBackend:
    """The backend `sampler.backend`, constructed for this model and these sampler settings; imported only when
    chosen, so `hf` never imports vLLM."""
    module_name, class_name = BACKENDS[sampler.backend].split(":")
    return getattr(importlib.import_module(module_name), class_name)(model, sampler, eos_token_ids)
