"""Energy-guided sampling (`--energy_guided`, ETS; `rlfree.lm.energy`): pi* ∝ pi_ref·exp(r/beta) block by block, each
block soft best-of-M with energies estimated by K rollouts. Language models: a completion is grown token block by
token block."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..data import check_output_dir, folder_stamp, load_prompts, process_state, run_in_shards
from ..errors import StageInputError
from ..lm.energy import EnergySearch, close, load_search
from ..lm.generation import model_context, prepare_prompts, task_tokenizer
from ..options import Options
from ..rewards.scoring import check_rewards, load_reward_function, reward_fingerprints, score_dataset
from ..sources import content_fingerprint
from .base import Sampler, SampleSettings
from .picking import cost_summary


@dataclass(kw_only=True)
class EnergyOptions(Options):
    """Energy-guided sampling (ETS): pi* block by block."""

    energy_guided: bool = field(
        default=False, metadata={"help": "Sample pi* ∝ pi_ref·exp(r/beta) block by block (ETS)."}
    )
    block_size: int = field(default=16, metadata={"help": "Tokens per block; >= --max_new_tokens is soft best-of-M."})
    num_candidates: int = field(default=4, metadata={"help": "Candidate blocks M drawn at each block."})
    num_rollouts: int = field(
        default=4, metadata={"help": "Rollouts K to the end estimating each candidate's energy."}
    )
    rollout_model: str | None = field(
        default=None,
        metadata={"help": "Smaller model with pi_ref's tokenizer for the rollouts, reweighted by pi_ref/p (ETS-IS)."},
    )
    rollout_log_ratio_clip: float = field(
        default=5.0, metadata={"help": "Clip of |log pi_ref/p| per rollout with --rollout_model (clips reported)."}
    )


class EnergyGuided(Sampler):
    name = "energy_guided"
    flag = "--energy_guided"
    usage = "--energy_guided with a reward"
    options = EnergyOptions
    uses_reward = True
    exclusive = {"rollout_model": "--rollout_model is for --energy_guided"}

    def selected(self, config: SampleSettings) -> bool:
        return config.energy_guided

    def check(self, config: SampleSettings) -> None:
        if config.family.name != "lm":
            raise StageInputError(
                "--energy_guided builds a completion block by block: it is for language models, not for the "
                f"{config.family.name} model {config.model_name_or_path} (use --soft_best_of_n)"
            )
        if not config.beta > 0 or math.isinf(config.beta):
            raise StageInputError(f"--beta must be finite and > 0 with --energy_guided, got {config.beta}")
        for flag in ("block_size", "num_candidates", "num_rollouts", "shard_size"):
            if getattr(config, flag) < 1:
                raise StageInputError(f"--{flag} must be >= 1, got {getattr(config, flag)}")
        if not config.rollout_log_ratio_clip > 0:
            raise StageInputError(f"--rollout_log_ratio_clip must be > 0, got {config.rollout_log_ratio_clip}")
        if not config.is_plain:
            raise StageInputError(
                "--energy_guided samples candidates and rollouts from pi_ref itself: leave --temperature 1, --top_k 0 "
                "and --top_p 1 (use --rollout_model for cheaper rollouts)"
            )

    def run(self, config: SampleSettings) -> Dataset:
        """ETS over the prompts, in shards that are written at once and resumed."""
        state = process_state()
        output = Path(config.output_dir) / "picked"
        paths = {"--model_name_or_path": config.model_name_or_path, "--rollout_model": config.rollout_model}
        tokenizer = task_tokenizer(config.model_name_or_path, config.trust_remote_code)
        prompt_rows = load_prompts(config.prompts, config.prompts_split)
        prompts = prepare_prompts(
            prompt_rows, tokenizer, config, model_context(paths, config.trust_remote_code), state.is_main_process
        )
        check_output_dir(output, "sampling", asdict(config), paths | {"--prompts": config.prompts})
        reward_functions = [load_reward_function(spec) for spec in config.reward]
        settings = asdict(config) | {
            "sampler": self.name,
            "family": config.family.name,
            "num_prompts": len(prompts.texts),
            "prompts_fingerprint": content_fingerprint(config.prompts),
            "reward_fingerprints": reward_fingerprints(config),
            "model_stamp": folder_stamp(config.model_name_or_path),
        }

        @functools.cache
        def functions() -> list[Callable]:
            models = [
                config.family.reward_model(path, config.trust_remote_code, state.device)
                for path in config.reward_model
            ]
            return reward_functions + models

        def score_completions(prompt_indices: list[int], completions: list[list[int]]) -> torch.Tensor:
            batch = {
                "prompt": [prompts.texts[p] for p in prompt_indices],
                "completion": tokenizer.batch_decode(completions, skip_special_tokens=True),
            }
            for name in prompts.extras[0]:
                batch[name] = [prompts.extras[p][name] for p in prompt_indices]
            scored = score_dataset(Dataset.from_dict(batch), functions(), config.reward_weights, config.batch_size)
            return torch.tensor(check_rewards(scored, drop_invalid=False)["reward"], dtype=torch.float64)

        @functools.cache
        def search() -> EnergySearch:
            size = {"beta": config.beta, "block_size": config.block_size, "num_candidates": config.num_candidates,
                    "num_rollouts": config.num_rollouts, "log_ratio_clip": config.rollout_log_ratio_clip}  # fmt: skip
            return load_search(
                config.model_name_or_path, config.rollout_model, config, tokenizer, score_completions, size,
                state.device,
            )  # fmt: skip

        def make_shard(positions: range) -> Dataset:
            shard = {prompts.sampled[i]: prompts.prompt_ids[prompts.sampled[i]] for i in positions}
            rows = []
            for group in search().run(shard, config.num_picks, config.seed):
                p, cost = group.prompt_index, group.cost
                rows.append(
                    {
                        "prompt": prompts.texts[p],
                        "prompt_index": p,
                        "pick_index": group.pick_index,
                        "completion": tokenizer.decode(group.completion_ids, skip_special_tokens=True),
                        "prompt_ids": prompts.prompt_ids[p],
                        "completion_ids": group.completion_ids,
                        "ref_logprob": group.ref_logprob,
                        "proposal_logprob": group.proposal_logprob,
                        "num_tokens": len(group.completion_ids),
                        "finish_reason": group.finish_reason,
                        "reward": group.reward,
                        "pick_probability": math.exp(group.pick_logprob),
                        "cost_sequences": cost["sequences"],
                        "cost_tokens": cost["tokens"],
                        "cost_model_tokens": cost["model_tokens"],
                        "cost_reward_calls": cost["reward_calls"],
                        "rollouts": cost["rollouts"],
                        "clipped_rollouts": cost["clipped"],
                        **prompts.extras[p],
                    }
                )
            return Dataset.from_list(rows)

        def finish(picked: Dataset) -> tuple[Dataset, dict]:
            record = cost_summary(picked)
            if config.rollout_model is not None:
                record["rollout_log_ratio_clipped"] = sum(picked["clipped_rollouts"]) / max(sum(picked["rollouts"]), 1)
            return picked, record

        try:
            return run_in_shards(
                output, "sampling", settings, len(prompts.sampled), config.shard_size, make_shard, finish=finish
            )
        finally:
            if search.cache_info().currsize:
                close(search())

    def describe(self, settings: dict) -> str:
        return (
            f"B={settings['block_size']} M={settings['num_candidates']} K={settings['num_rollouts']} "
            f"beta={settings['beta']}"
        )


ENERGY_GUIDED = EnergyGuided()
