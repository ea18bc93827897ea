"""The transformers backend: `model.generate` with a sampler of our own, so that its draws are exactly known.

`generate` is run greedily with no processors of its own; the warpers of `sampler_processors` (temperature, top-k,
top-p, in `generate`'s order) shape the distribution and `InverseCDFSampling` draws from it with counter-based noise
(`seeds.uniforms`), so a sample depends on (seed, prompt, sample index) only. Sampling the float32 model's own softmax
(no warpers), the sampler keeps the log-probability of each draw (`model_token_logprobs`), which the stage takes as
log pi_ref, with no teacher-forced pass, when that model is pi_ref. Otherwise the proposal log-probability is left to
the teacher-forced pass, which applies the same warpers (`proposal_token_logprobs` is None), except for subclasses
that mix in other models' logits (`guides`): no teacher-forced pass of one model gives their distribution, so they
report the log-probability each token was drawn with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ...options import SamplerOptions
from ...seeds import sample_seed, uniforms
from . import BackendModel, Draw


def sampler_processors(temperature: float, top_k: int, top_p: float) -> list:
    """The logits warpers `generate` applies for these settings, in its order (temperature, top-k, top-p)."""
    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


class InverseCDFSampling(LogitsProcessor):
    """Turns greedy decoding into exact sampling: each row keeps only the token its uniform selects.

    For the whole batch at once: softmax of the warped scores in float64, cumulative sums, and one search per row for
    the first token whose cumulative probability exceeds u·total, where u is the row's uniform for this step. A token of
    probability 0 (cut by top-k/top-p) spans an empty interval and is never chosen. The uniforms depend on the row's
    sample seed and the step only, so a row samples the same tokens in any batch.
    """

    def __init__(self, sample_seeds: list[int], prompt_width: int, record_logprobs: bool = False):
        self.sample_seeds = sample_seeds
        self.prompt_width = prompt_width
        self.record_logprobs = record_logprobs
        self.chosen_logprobs: list[torch.Tensor] = []  # per step, when recorded: [batch] log-probability of the draw

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.double(), dim=-1)
        cumulative = probs.cumsum(-1)
        u = uniforms(self.sample_seeds, input_ids.shape[1] - self.prompt_width).to(scores.device)
        chosen = torch.searchsorted(cumulative, (u * cumulative[:, -1]).unsqueeze(-1), right=True)
        chosen = chosen.clamp_(max=scores.shape[-1] - 1)
        if self.record_logprobs:
            self.chosen_logprobs.append((probs.gather(-1, chosen) / cumulative[:, -1:]).log().squeeze(-1).cpu())
        return torch.full_like(scores, -torch.inf).scatter_(-1, chosen, 0.0)


@contextlib.contextmanager
def plain_sampling(model: PreTrainedModel, eos: list[int], pad_token_id: int) -> Iterator[GenerationConfig]:
    """A greedy generation config with no processors of its own: sampling comes only from `InverseCDFSampling`.

    `generate` fills every unset option from `model.generation_config` (top_k=50 by default, and checkpoints often
    ship temperature, top_p, repetition penalties or suppressed tokens). Swapping in a bare config for the duration
    means the only processors applied are the warpers of `sampler_processors` and the sampler.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad_token_id)
    try:
        # Greedy decoding never applies the sampling warpers (top_k, top_p, temperature), so they are left unset:
        # setting them here only makes transformers warn on every call. The processors greedy does apply are off.
        yield GenerationConfig(
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_length=0,
            eos_token_id=eos,
            pad_token_id=pad_token_id,
        )
    finally:
        model.generation_config = saved


def split_completion(new_tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    """Cut generated ids after the first EOS (kept) and report why generation stopped."""
    for position, token in enumerate(new_tokens):
        if token in eos:
            return new_tokens[: position + 1], "stop"
    return new_tokens, "length"


class HFBackend:
    """`transformers` generate on the stage's own model, left-padded batches of `--batch_size` sequences."""

    name = "hf"
    reports_logprobs = False  # True where `guides` change the distribution beyond what teacher forcing reproduces

    def __init__(self, model: BackendModel, sampler: SamplerOptions, eos_token_ids: list[int]):
        self.model = model.load()
        self.sampler = sampler
        self.eos = eos_token_ids
        # Left padding reads pad tokens only under a zero attention mask, so any id serves.
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = eos_token_ids[0] if pad is None else pad
        self.warpers = sampler_processors(sampler.temperature, sampler.top_k, sampler.top_p)
        # Where the sampler draws from the model's own float32 softmax, its log-probabilities are the model's.
        self.records_model_logprobs = (
            not self.reports_logprobs
            and not self.warpers
            and not sampler.teacher_forced_logprobs
            and self.model.dtype == torch.float32
        )

    def guides(self, attention_mask: torch.Tensor) -> list[LogitsProcessor]:
        """Processors applied to the model's logits before the warpers, for one batch (none: the model's own)."""
        return []

    @torch.no_grad()
    def draw(
        self, prompt_ids: dict[int, list[int]], num_samples: int, seed: int, max_new_tokens: int | None = None
    ) -> list[Draw]:
        jobs = [(p, s) for p in prompt_ids for s in range(num_samples)]
        draws = []
        with (
            plain_sampling(self.model, self.eos, self.pad_token_id) as generation_config,
            tqdm(total=len(jobs), desc="generate", unit="seq", leave=False) as progress,
        ):
            generation_config.update(max_new_tokens=max_new_tokens or self.sampler.max_new_tokens)
            for start in range(0, len(jobs), self.sampler.batch_size):
                batch = jobs[start : start + self.sampler.batch_size]
                prompts = [prompt_ids[p] for p, _ in batch]
                width = max(len(ids) for ids in prompts)
                # Left padding: every row's new tokens start at the same column, so the step is the same for all.
                input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(prompts):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                seeds = [sample_seed(seed, p, s) for p, s in batch]
                sampler = InverseCDFSampling(seeds, width, self.reports_logprobs or self.records_model_logprobs)
                attention_mask = attention_mask.to(self.model.device)
                output = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                    logits_processor=LogitsProcessorList([*self.guides(attention_mask), *self.warpers, sampler]),
                )
                chosen_logprobs = torch.stack(sampler.chosen_logprobs, dim=1) if sampler.record_logprobs else None
                for row, ((prompt_index, sample_index), ids) in enumerate(zip(batch, output, strict=True)):
                    completion, reason = split_completion(ids[width:].tolist(), set(self.eos))
                    draw = Draw(prompt_index, sample_index, completion, reason)
                    if chosen_logprobs is not None:
                        logprobs = chosen_logprobs[row, : len(completion)].tolist()
                        if self.reports_logprobs:
                            draw.proposal_token_logprobs = logprobs
                        else:
                            draw.model_token_logprobs = logprobs
                    draws.append(draw)
                progress.update(len(batch))
        return draws

    def close(self) -> None:
        """Nothing to free: the model belongs to the stage, which scores the draws with it."""
