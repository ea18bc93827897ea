"""Energy-guided sampling (ETS): pi*(o|q) ∝ pi_ref(o|q)·exp(r(q,o)/beta), sampled block by block, without training.

pi*'s next block given a prefix s is pi_ref(block|s)·Z(s + block) / Z(s), with the energy Z(s) = E_{pi_ref}[exp(r/beta)
| s] over the completions of s. At each block: draw M candidate blocks from the sampler, estimate each one's energy
with K rollouts to the end, and pick one candidate with probability ∝ energy · pi_ref(block|s) / p(block|s) (the
correction is 0 when the sampler is pi_ref itself; it absorbs an engine's numerics). A candidate that ends the
completion (EOS, or the token budget) has its energy exactly: exp(r/beta) of the finished completion. Exact as M and
K grow (the estimate is consistent and the pick is soft best-of-M over the blocks). One block (block size >= the
budget) is soft best-of-M: the candidates are drawn with soft best-of-N's seeds and picked with its uniforms, so both
return the same completions.

ETS-IS: rollouts from a cheaper model p_small with pi_ref's tokenizer, each weighted by rho = pi_ref/p_small of its
tokens (read teacher-forced), Z ≈ mean_k rho_k·exp(r_k/beta). log rho is clipped to [-clip, clip] (biased, but bounded
variance); how often the clip bites is reported.

Randomness: candidates of block 0 use (seed, prompt, pick·M + candidate) like soft best-of-N; later blocks and the
rollouts draw from seeds named by (seed, block, kind) and keyed by group (and candidate), and the picks use the
counter-based uniforms of (seed, prompt, pick, block); so the result does not depend on shards, batches or processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..options import LoadOptions, SamplerOptions
from ..seeds import pick_uniforms, stream_seed
from ..weights import group_log_mean_exp, normalize_per_group, pick
from .backends import BackendModel, Draw, SamplingBackend, load_backend
from .generation import check_same_tokens, teacher_forced
from .loading import eos_token_ids, load_causal_lm, load_tokenizer

# (prompt indices, completion ids) -> one reward per completion
Scorer = Callable[[list[int], list[list[int]]], torch.Tensor]


@dataclass
class Group:
    """One pick of one prompt: the completion grown so far and what it cost."""

    prompt_index: int
    pick_index: int
    completion_ids: list[int] = field(default_factory=list)
    ref_logprob: float = 0.0
    proposal_logprob: float = 0.0
    pick_logprob: float = 0.0  # log of the product of the per-block pick probabilities
    finish_reason: str | None = None
    reward: float | None = None
    cost: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("sequences", "tokens", "model_tokens", "reward_calls", "rollouts", "clipped"), 0
        )
    )


@dataclass
class EnergySearch:
    """What one energy-guided run needs: the models, the sampler settings and the search's size."""

    backend: SamplingBackend  # draws candidate blocks (and rollouts, without a rollout model) from pi_ref
    reference: PreTrainedModel  # pi_ref, for the teacher-forced log-probabilities
    sampler: SamplerOptions
    pad_token_id: int
    score: Scorer
    beta: float
    block_size: int
    num_candidates: int
    num_rollouts: int
    rollout_backend: SamplingBackend | None = None  # ETS-IS: rollouts from a smaller model ...
    rollout_model: PreTrainedModel | None = None  # ... whose teacher-forced log-probabilities give rho
    log_ratio_clip: float = 5.0

    def run(self, prompt_ids: dict[int, list[int]], num_picks: int, seed: int) -> list[Group]:
        """`num_picks` completions per prompt, each grown block by block; groups in (prompt, pick) order."""
        groups = {p * num_picks + k: Group(p, k) for p in prompt_ids for k in range(num_picks)}
        block = 0
        while active := [g for g in groups if groups[g].finish_reason is None]:
            self.step(groups, active, prompt_ids, num_picks, seed, block)
            block += 1
        return list(groups.values())

    def step(
        self,
        groups: dict[int, Group],
        active: list[int],
        prompt_ids: dict[int, list[int]],
        num_picks: int,
        seed: int,
        block: int,
    ) -> None:
        budget = self.sampler.max_new_tokens
        M = self.num_candidates
        length = block * self.block_size  # every active group has exactly this many tokens
        new_tokens = min(self.block_size, budget - length)
        contexts = {g: prompt_ids[groups[g].prompt_index] + groups[g].completion_ids for g in active}
        if block == 0:  # soft best-of-N's candidates: prompt p, samples pick·M + candidate
            draws = self.backend.draw(prompt_ids, num_picks * M, seed, new_tokens)
            draws = [
                replace(
                    d, prompt_index=d.prompt_index * num_picks + d.sample_index // M, sample_index=d.sample_index % M
                )
                for d in draws
            ]
        else:
            draws = self.backend.draw(contexts, M, stream_seed(seed, "candidates", block), new_tokens)
        rows = teacher_forced(draws, contexts, self.reference, None, self.sampler, self.pad_token_id)
        log_energy = torch.empty(len(draws), dtype=torch.float64)
        reward = torch.full((len(draws),), math.nan, dtype=torch.float64)  # of the candidates that end the completion
        finished = [
            d.finish_reason == "stop" or length + len(d.completion_ids) >= budget for d in draws
        ]  # the candidate ends the completion: its energy is exact
        done = [i for i, end in enumerate(finished) if end]
        if done:
            completions = [groups[draws[i].prompt_index].completion_ids + draws[i].completion_ids for i in done]
            reward[done] = self.score([groups[draws[i].prompt_index].prompt_index for i in done], completions)
            log_energy[done] = reward[done] / self.beta
            for i in done:
                groups[draws[i].prompt_index].cost["reward_calls"] += 1
        open_ = [i for i, end in enumerate(finished) if not end]
        if open_:  # open candidates hold a whole block, so the same number of tokens remains after each
            remaining = budget - length - new_tokens
            log_energy[open_] = self.rollout_energy(groups, draws, open_, contexts, seed, block, remaining)
        for draw in draws:
            cost = groups[draw.prompt_index].cost
            cost["sequences"] += 1
            cost["tokens"] += len(draw.completion_ids)
            cost["model_tokens"] += 2 * len(draw.completion_ids)  # sampled, then read teacher-forced
        correction = torch.tensor([r["ref_logprob"] - r["proposal_logprob"] for r in rows], dtype=torch.float64)
        log_weight = log_energy + correction
        group_ids = torch.tensor([d.prompt_index for d in draws])
        group_index = torch.unique(group_ids, return_inverse=True)[1]
        keys = [(groups[int(g)].prompt_index, groups[int(g)].pick_index, block) for g in group_ids]
        uniform = pick_uniforms(seed, keys, [d.sample_index for d in draws])
        chosen = pick(log_weight, group_index, uniform)
        probability = normalize_per_group(log_weight, group_index).exp()
        for row in chosen.tolist():
            draw, group = draws[row], groups[draws[row].prompt_index]
            group.completion_ids = group.completion_ids + draw.completion_ids
            group.ref_logprob += rows[row]["ref_logprob"]
            group.proposal_logprob += rows[row]["proposal_logprob"]
            group.pick_logprob += math.log(probability[row].item())
            if finished[row]:
                group.finish_reason = draw.finish_reason
                group.reward = reward[row].item()

    def rollout_energy(
        self,
        groups: dict[int, Group],
        draws: list[Draw],
        candidates: list[int],
        contexts: dict[int, list[int]],
        seed: int,
        block: int,
        remaining: int,
    ) -> torch.Tensor:
        """log of the estimated energy of each open candidate: `remaining` tokens at most in each of K rollouts to the
        end, log mean rho·exp(r/beta)."""
        M = self.num_candidates
        key = {i: draws[i].prompt_index * M + draws[i].sample_index for i in candidates}
        rollout_contexts = {key[i]: contexts[draws[i].prompt_index] + draws[i].completion_ids for i in candidates}
        candidate_of = {key[i]: i for i in candidates}
        backend = self.rollout_backend or self.backend
        rollouts = backend.draw(rollout_contexts, self.num_rollouts, stream_seed(seed, "rollouts", block), remaining)
        owner = [draws[candidate_of[r.prompt_index]].prompt_index for r in rollouts]
        completions = [
            groups[g].completion_ids + draws[candidate_of[r.prompt_index]].completion_ids + r.completion_ids
            for g, r in zip(owner, rollouts, strict=True)
        ]
        terms = self.score([groups[g].prompt_index for g in owner], completions) / self.beta
        models = 1
        if self.rollout_model is not None:
            rows = teacher_forced(
                rollouts, rollout_contexts, self.rollout_model, self.reference, self.sampler, self.pad_token_id
            )
            log_ratio = torch.tensor([r["ref_logprob"] - r["proposal_logprob"] for r in rows], dtype=torch.float64)
            clipped = log_ratio.abs() > self.log_ratio_clip
            terms = terms + log_ratio.clamp(-self.log_ratio_clip, self.log_ratio_clip)
            models = 3  # sampled by the small model, then read by it and by pi_ref
            for g, bit in zip(owner, clipped.tolist(), strict=True):
                groups[g].cost["clipped"] += bit
        for g, rollout in zip(owner, rollouts, strict=True):
            cost = groups[g].cost
            cost["sequences"] += 1
            cost["tokens"] += len(rollout.completion_ids)
            cost["model_tokens"] += models * len(rollout.completion_ids)
            cost["reward_calls"] += 1
            cost["rollouts"] += 1
        position = {i: n for n, i in enumerate(candidates)}
        return group_log_mean_exp(terms, torch.tensor([position[candidate_of[r.prompt_index]] for r in rollouts]))


def load_search(
    model: str,
    rollout_model: str | None,
    settings: SamplerOptions | LoadOptions,
    tokenizer: PreTrainedTokenizerBase,
    score: Scorer,
    search: dict,
    device: torch.device,
) -> EnergySearch:
    """The search over `model` (pi_ref), with its rollouts from `rollout_model` (ETS-IS, checked to share pi_ref's
    tokens) when given; `search` holds the search's size: beta, block_size, num_candidates, num_rollouts and
    log_ratio_clip. Its backends are open: close them with `close`."""
    reference = load_causal_lm(model, settings.dtype, settings.trust_remote_code, device)
    eos = eos_token_ids(reference, tokenizer)
    backend = load_backend(
        BackendModel(model, settings.dtype, settings.trust_remote_code, lambda: reference), settings, eos
    )
    rollout_network = rollout_backend = None
    if rollout_model is not None:
        rollout_network = load_causal_lm(rollout_model, settings.dtype, settings.trust_remote_code, device)
        rollout_tokenizer = load_tokenizer(rollout_model, settings.trust_remote_code)
        check_same_tokens(rollout_model, rollout_network, rollout_tokenizer, model, reference, tokenizer)
        rollout = BackendModel(rollout_model, settings.dtype, settings.trust_remote_code, lambda: rollout_network)
        rollout_backend = load_backend(rollout, settings, eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return EnergySearch(
        backend, reference, settings, pad, score, search["beta"], search["block_size"], search["num_candidates"],
        search["num_rollouts"], rollout_backend, rollout_network, search["log_ratio_clip"],
    )  # fmt: skip


def close(search: EnergySearch) -> None:
    """Close the search's sampling engines."""
    search.backend.close()
    if search.rollout_backend is not None:
        search.rollout_backend.close()
