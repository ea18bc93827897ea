"""Guidance between a reference and a tuned model (RLG, 2508.21016; DeRa for LMs): sampling pi_ref^(1-w)·pi_theta^w.

When pi_theta is the KL-regularized optimum pi_ref·exp(r/beta)/Z, the sequence-level mix is pi_ref·exp(w·r/beta): the
guidance scale w sets the KL coefficient to beta/w at inference time (w < 1 interpolates, w > 1 extrapolates).

Mixing logits token by token, softmax((1-w)·log pi_ref + w·log pi_theta), is fast but is not that mix: every token is
renormalized on its own. It is the proposal here. `GuidedBackend` draws from it (the HF backend with the reference
model's log-probabilities mixed in at every step) and reports each token's log-probability under the distribution it
was drawn from; `guidance_log_weights` turns a candidate's three sequence log-probabilities into its self-normalized
importance weight toward the exact sequence-level mix.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessor, PreTrainedModel

from ..adapters import AdapterOff, as_reference
from ..options import SamplerOptions
from .backends import BackendModel
from .backends.hf import HFBackend
from .logprobs import unwrap


class GuidedLogits(LogitsProcessor):
    """Replaces the tuned model's logits by (1-w)·log_softmax(ref) + w·log_softmax(tuned), for one batch.

    The reference model runs beside `generate` with a KV cache of its own: on the first step over the (left-padded)
    prompts, then one token per step. A token either model gives probability 0 gets 0 in the mix: with w > 1 the
    reference's exponent is negative and pi_ref = 0 would otherwise become an infinite weight.
    """

    def __init__(self, ref_model: PreTrainedModel | AdapterOff, scale: float, attention_mask: torch.Tensor):
        self.ref_model = ref_model
        self.scale = scale
        self.attention_mask = attention_mask
        self.cache = None
        self.seen = 0  # tokens of input_ids the reference model has read
        # transformers renamed past_key_values to cache (5.2x); vLLM's pin is older.
        with as_reference(ref_model) as model:
            parameters = inspect.signature(unwrap(model).forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new_ids = input_ids[:, self.seen :]
        grown = input_ids.shape[1] - self.attention_mask.shape[1]
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(input_ids), grown)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.seen :]
        with as_reference(self.ref_model) as ref_model:
            output = ref_model(
                input_ids=new_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_name: self.cache},
            )
        self.cache, self.seen = output[self.cache_name], input_ids.shape[1]
        ref = output.logits[:, -1].float().log_softmax(-1)
        tuned = scores.float().log_softmax(-1)
        mixed = (1 - self.scale) * ref + self.scale * tuned
        return mixed.masked_fill(ref.isneginf() | tuned.isneginf(), -torch.inf)


class GuidedBackend(HFBackend):
    """The HF backend sampling the token-level mix of the tuned model (`model`) and `ref_model` at scale w."""

    name = "hf-guided"
    reports_logprobs = True

    def __init__(
        self,
        model: BackendModel,
        sampler: SamplerOptions,
        eos_token_ids: list[int],
        ref_model: PreTrainedModel | AdapterOff,
        scale: float,
    ):
        super().__init__(model, sampler, eos_token_ids)
        self.ref_model = ref_model
        self.scale = scale

    def guides(self, attention_mask: torch.Tensor) -> list[LogitsProcessor]:
        return [GuidedLogits(self.ref_model, self.scale, attention_mask)]


def guidance_log_weights(
    ref_logprob: torch.Tensor, model_logprob: torch.Tensor, proposal_logprob: torch.Tensor, scale: float
) -> torch.Tensor:
    """log of pi_ref^(1-w)·pi_theta^w / p_mix per candidate: self-normalized per pick, the exact sequence-level mix."""
    return (1 - scale) * ref_logprob + scale * model_logprob - proposal_logprob
