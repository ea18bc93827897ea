"""`rlfree sample`: draw from pi* at inference time, with no training. Three samplers, one output.

- **Soft best-of-N** (`--soft_best_of_n N`): for each pick, draw N completions, score them, return one with probability
  softmax_i(log w_i), log w_i = r_i/beta + log pi_ref(o_i|q) - log p(o_i|q): the weighting stage's log-weight, so the
  picks target pi_ref·exp(r/beta) even with temperature/top-k/top-p. beta = 0 is hard best-of-N, the beta -> 0 limit:
  only the highest-reward candidates can be picked, ties broken in proportion to pi_ref/p.
- **Guidance** (`--guidance_scale W --ref_model REF`, `rlfree.lm.guidance`): M candidates from the token-level mix of
  REF and the tuned model, one picked with weights pi_ref^(1-W)·pi_theta^W / p_mix, which reaches the sequence-level
  mix (pi_ref·exp(W·r/beta) when the tuned model is the optimum at beta). M = 1 is plain token-level mixing.
- **Energy-guided** (`--energy_guided`, `rlfree.lm.energy`): pi* block by block, each block soft best-of-M with
  energies estimated by K rollouts.
- **Classifier-free guidance as soft best-of-N** (`--cfg_best_of_n N`, class-conditional diffusion pipelines,
  `rlfree.diffusion.classifier`): N samples of p(x|c), one picked ∝ p(c|x)^w, with log p(c|x) estimated from the
  pipeline's own conditional and unconditional denoising losses; tends to p(x|c)·p(c|x)^w.

Each writes `OUTPUT_DIR/picked`, `--num_picks` rows per prompt with `pick_index`, `pick_probability` and what the pick
cost (`cost_sequences`, `cost_tokens`, `cost_model_tokens`: tokens times the models that ran on them, `cost_reward_calls`),
summed in the sidecar's `cost`, so samplers and trained models compare at equal compute.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..data import check_output_dir, folder_stamp, load_prompts, process_state, run_in_shards, save_stage
from ..diffusion import is_pipeline
from ..diffusion.classifier import check_null_class, classify
from ..errors import StageInputError
from ..lm.backends import BackendModel, load_backend
from ..lm.energy import EnergySearch
from ..lm.generation import check_same_tokens, model_context, prepare_prompts, task_tokenizer
from ..lm.guidance import guidance_log_weights
from ..lm.modeling import eos_token_ids, load_causal_lm, load_tokenizer
from ..options import (
    LoadOptions,
    Options,
    PromptOptions,
    RewardOptions,
    SamplerOptions,
    check_prompts,
    options_of,
    prompts_field,
    required_output_dir_field,
)
from ..rewards.scoring import RewardModel, load_reward_function, reward_fingerprints, score_dataset
from ..seeds import pick_uniforms
from ..sources import content_fingerprint
from ..weights import group_sum, normalize_per_group, pick, pick_log_weights
from .generate import GenerateConfig, check_guidance, generate
from .score import ScoreConfig, check_rewards, score
from .weight import proposal_correction

COST_COLUMNS = ("cost_sequences", "cost_tokens", "cost_model_tokens", "cost_reward_calls")


@dataclass(kw_only=True)
class GuidanceOptions(Options):
    """Guidance between the reference and the tuned model (RLG)."""

    guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Sample pi_ref^(1-W)·pi_theta^W of --ref_model and --model_name_or_path (tuned): 0 = pi_ref, "
            "1 = the tuned model, > 1 extrapolates (beta/W for a model trained at beta)."
        },
    )
    guidance_candidates: int | None = field(
        default=None,
        metadata={
            "help": "Token-level-mixed candidates M per pick, reweighted to the exact mix; 1 = plain mixing. Default "
            "8 for a language model; a diffusion pipeline mixes its predictions step by step with no reweighting (1)."
        },
    )
    ref_model: str | None = field(default=None, metadata={"help": "Reference model pi_ref for --guidance_scale."})


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


@dataclass(kw_only=True)
class ClassifierOptions(Options):
    """Classifier-free guidance as soft best-of-N (anthology eq. 35-37), for class-conditional diffusion pipelines."""

    cfg_best_of_n: int | None = field(
        default=None,
        metadata={
            "help": "Candidates N per pick, drawn from p(x|c); one picked ∝ p(c|x)^--cfg_scale, log p(c|x) estimated "
            "by the pipeline's conditional minus unconditional denoising losses (a class-conditional pipeline needs "
            "--null_class; a text-to-image one's null condition is the empty prompt)."
        },
    )
    cfg_scale: float = field(
        default=1.0,
        metadata={
            "help": "w: picks tend to p(x|c)·p(c|x)^w, what CFG's guidance scale 1 + w aims at; 0 = no guidance."
        },
    )
    null_class: int | None = field(
        default=None,
        metadata={
            "help": "Class-conditional pipelines: the class label the UNet was trained with in place of a dropped "
            "condition (its null class)."
        },
    )
    classifier_estimates: int = field(
        default=16,
        metadata={"help": "Draws of (t, noise) per candidate estimating log p(c|x); each costs 2 UNet passes."},
    )


@dataclass
class SampleConfig(
    SamplerOptions, RewardOptions, PromptOptions, LoadOptions, GuidanceOptions, EnergyOptions, ClassifierOptions
):
    """Settings of `rlfree sample`: one of --soft_best_of_n, --guidance_scale, --energy_guided or --cfg_best_of_n."""

    model_name_or_path: str = field(
        metadata={"help": "Model sampled from: pi_ref, or the tuned model with --guidance_scale."}
    )
    prompts: str | None = prompts_field(optional=True)
    output_dir: str = required_output_dir_field("Root folder: picked/ (the result) and the sampler's stages in it.")
    soft_best_of_n: int | None = field(default=None, metadata={"help": "Soft best-of-N: candidates N per pick."})
    beta: float = field(
        default=1.0,
        metadata={"help": "KL coefficient: pick with probability softmax(r/beta); 0 = hard best-of-N."},
    )
    num_picks: int = field(
        default=1, metadata={"help": "Completions returned per prompt, each picked from its own candidates."}
    )
    shard_size: int = field(
        default=16, metadata={"help": "Prompts per shard of energy-guided sampling (written at once and resumed)."}
    )

    @property
    def sampler(self) -> str:
        if self.guidance_scale is not None:
            return "guided"
        if self.cfg_best_of_n is not None:
            return "cfg_best_of_n"
        return "energy_guided" if self.energy_guided else "soft_best_of_n"

    @property
    def reward_required(self) -> bool:
        return self.sampler in ("soft_best_of_n", "energy_guided")

    def __post_init__(self):
        super().__post_init__()
        check_prompts(self)
        chosen = [
            flag
            for flag, on in (
                ("--soft_best_of_n", self.soft_best_of_n is not None),
                ("--guidance_scale", self.guidance_scale is not None),
                ("--energy_guided", self.energy_guided),
                ("--cfg_best_of_n", self.cfg_best_of_n is not None),
            )
            if on
        ]
        if len(chosen) != 1:
            raise StageInputError(
                f"choose one sampler (got {', '.join(chosen) or 'none'}): --soft_best_of_n N with a reward, "
                "--guidance_scale W with --ref_model, --energy_guided with a reward, or --cfg_best_of_n N "
                "(conditional diffusion pipelines)"
            )
        if self.num_picks < 1:
            raise StageInputError(f"--num_picks must be >= 1, got {self.num_picks}")
        if self.ref_model is not None and self.sampler != "guided":
            raise StageInputError("--ref_model is the reference of --guidance_scale; the other samplers sample it")
        if self.rollout_model is not None and self.sampler != "energy_guided":
            raise StageInputError("--rollout_model is for --energy_guided")
        if self.sampler == "soft_best_of_n":
            if self.soft_best_of_n < 1:
                raise StageInputError(f"--soft_best_of_n must be >= 1, got {self.soft_best_of_n}")
            if not self.beta >= 0 or math.isinf(self.beta):
                raise StageInputError(f"--beta must be finite and >= 0 (0 = hard best-of-N), got {self.beta}")
        elif self.sampler == "guided":
            check_guidance(self.guidance_scale, self.ref_model, self.backend)
            if is_pipeline(self.model_name_or_path):
                if self.guidance_candidates not in (None, 1):
                    raise StageInputError(
                        f"--guidance_candidates {self.guidance_candidates}: picking among candidates needs their exact "
                        "likelihoods, which a diffusion pipeline lacks; RLG's step-by-step mix is drawn directly (1)"
                    )
                self.guidance_candidates = 1
            elif self.guidance_candidates is None:
                self.guidance_candidates = 8
            if self.guidance_candidates < 1:
                raise StageInputError(f"--guidance_candidates must be >= 1, got {self.guidance_candidates}")
            if self.reward or self.reward_model:
                raise StageInputError(
                    "--guidance_scale uses no reward (the tuned model carries it); drop --reward/--reward_model and "
                    "score the picks with `rlfree score` or `rlfree evaluate`"
                )
        elif self.sampler == "cfg_best_of_n":
            self.check_classifier()
        else:
            self.check_energy()

    def check_classifier(self) -> None:
        if not is_pipeline(self.model_name_or_path):
            raise StageInputError(
                f"--cfg_best_of_n picks by a diffusion pipeline's own classifier; {self.model_name_or_path} is not a "
                "pipeline folder (for a language model use --soft_best_of_n with a reward)"
            )
        check_null_class(self.model_name_or_path, self.null_class)
        for flag in ("cfg_best_of_n", "classifier_estimates"):
            if getattr(self, flag) < 1:
                raise StageInputError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if not self.cfg_scale >= 0:
            raise StageInputError(f"--cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}")
        if self.reward or self.reward_model:
            raise StageInputError(
                "--cfg_best_of_n picks by the pipeline's own p(c|x), not a reward; drop --reward/--reward_model (or use "
                "--soft_best_of_n)"
            )

    def check_energy(self) -> None:
        if is_pipeline(self.model_name_or_path):
            raise StageInputError(
                "--energy_guided builds a completion block by block: it is for language models, not for the diffusion "
                f"pipeline {self.model_name_or_path} (use --soft_best_of_n)"
            )
        if not self.beta > 0 or math.isinf(self.beta):
            raise StageInputError(f"--beta must be finite and > 0 with --energy_guided, got {self.beta}")
        for flag in ("block_size", "num_candidates", "num_rollouts", "shard_size"):
            if getattr(self, flag) < 1:
                raise StageInputError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if not self.rollout_log_ratio_clip > 0:
            raise StageInputError(f"--rollout_log_ratio_clip must be > 0, got {self.rollout_log_ratio_clip}")
        if not self.is_plain:
            raise StageInputError(
                "--energy_guided samples candidates and rollouts from pi_ref itself: leave --temperature 1, --top_k 0 "
                "and --top_p 1 (use --rollout_model for cheaper rollouts)"
            )


def candidate_groups(candidates: Dataset, num_candidates: int, num_picks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pick number, pick group) of each candidate row: rows with sample_index in [k·N, (k+1)·N) of a prompt are the
    candidates of its pick k; groups are numbered 0..G-1 in (prompt, pick) order."""
    pick_number = torch.tensor(candidates["sample_index"]) // num_candidates
    # Dense numbering: prompts left out (--long_prompts skip) leave gaps in prompt_index.
    group = torch.unique(torch.tensor(candidates["prompt_index"]) * num_picks + pick_number, return_inverse=True)[1]
    return pick_number, group


def pick_dataset(
    candidates: Dataset, log_weight: torch.Tensor, num_candidates: int, num_picks: int, seed: int
) -> Dataset:
    """One row per (prompt, pick), in group order, drawn ∝ exp(log_weight) among its candidates, with `pick_index` and
    `pick_probability`. The pick's uniforms depend on (seed, prompt, pick, candidate) only, as the energy-guided
    sampler's first block does.
    """
    pick_number, group = candidate_groups(candidates, num_candidates, num_picks)
    keys = [(p, k, 0) for p, k in zip(candidates["prompt_index"], pick_number.tolist(), strict=True)]
    candidate = torch.tensor(candidates["sample_index"]) - pick_number * num_candidates
    rows = pick(log_weight, group, pick_uniforms(seed, keys, candidate.numpy()))
    probability = normalize_per_group(log_weight, group).exp()[rows]
    picked = candidates.select(rows.tolist())
    picked = picked.add_column("pick_index", pick_number[rows].tolist())
    return picked.add_column("pick_probability", probability.tolist())


def with_costs(
    picked: Dataset,
    candidates: Dataset,
    config: SampleConfig,
    num_candidates: int,
    models: int,
    scored: bool,
    extra_passes: int = 0,
) -> Dataset:
    """Each pick's cost: its N candidates, their tokens, and `models` model passes over each token, plus
    `extra_passes` per candidate (the classifier estimate's). For a diffusion pipeline a candidate's "tokens" are its
    denoising steps, one network pass each.

    `picked` holds one row per pick group in group order, as `pick_dataset` returns it.
    """
    _, group = candidate_groups(candidates, num_candidates, config.num_picks)
    if "num_tokens" in candidates.column_names:
        lengths = torch.tensor(candidates["num_tokens"])
    else:
        lengths = torch.full((len(candidates),), config.num_inference_steps)
    tokens = group_sum(lengths, group, len(picked)).tolist()
    columns = {
        "cost_sequences": [num_candidates] * len(picked),
        "cost_tokens": tokens,
        "cost_model_tokens": [models * count + extra_passes * num_candidates for count in tokens],
        "cost_reward_calls": [num_candidates if scored else 0] * len(picked),
    }
    for name, values in columns.items():
        picked = picked.add_column(name, values)
    return picked


def cost_summary(picked: Dataset) -> dict:
    """Totals of the cost columns and their mean per pick, for the sidecar."""
    totals = {name.removeprefix("cost_"): sum(picked[name]) for name in COST_COLUMNS}
    per_pick = {name: value / max(len(picked), 1) for name, value in totals.items()}
    return {"cost": {"total": totals, "per_pick": per_pick, "picks": len(picked)}}


def save_picks(picked: Dataset, config: SampleConfig, input_dir: Path) -> Dataset:
    """Write `picked/` with its settings and cost; under `accelerate launch` every process picked the same rows."""
    state = process_state()
    if state.is_main_process:
        settings = asdict(config) | {
            "sampler": config.sampler,
            "prompts_fingerprint": content_fingerprint(config.prompts),
        }
        settings |= cost_summary(picked)
        save_stage(picked, Path(config.output_dir) / "picked", "sampling", settings, input_dir=input_dir)
    state.wait_for_everyone()
    return picked


def candidates_config(config: SampleConfig, num_candidates: int, **extra) -> GenerateConfig:
    return GenerateConfig(
        **options_of(LoadOptions, config) | options_of(PromptOptions, config) | options_of(SamplerOptions, config),
        model_name_or_path=config.model_name_or_path,
        prompts=config.prompts,
        output_dir=str(Path(config.output_dir) / "candidates"),
        num_samples=config.num_picks * num_candidates,
        **extra,
    )


def soft_best_of_n(config: SampleConfig) -> Dataset:
    """Generate num_picks·N candidates per prompt, score them, pick; write output_dir/{candidates,scored,picked}."""
    root = Path(config.output_dir)
    check_output_dir(root / "picked", "sampling", asdict(config), {})
    generate(candidates_config(config, config.soft_best_of_n))
    scored = score(
        ScoreConfig(
            **options_of(RewardOptions, config),
            input_dir=str(root / "candidates"),
            output_dir=str(root / "scored"),
            batch_size=config.batch_size,
        )
    )
    correction = proposal_correction(scored)
    reward = torch.tensor(scored["reward"], dtype=torch.float64)
    _, group = candidate_groups(scored, config.soft_best_of_n, config.num_picks)
    log_weight = pick_log_weights(reward, correction, group, config.beta)
    picked = pick_dataset(scored, log_weight, config.soft_best_of_n, config.num_picks, config.seed)
    # Each candidate token is sampled once and read once teacher-forced; a diffusion sample's steps once.
    passes = 1 if is_pipeline(config.model_name_or_path) else 2
    return save_picks(with_costs(picked, scored, config, config.soft_best_of_n, passes, True), config, root / "scored")


def guided(config: SampleConfig) -> Dataset:
    """M token-level-mixed candidates per pick (`generate --guidance_scale`), one picked toward the sequence-level mix."""
    M = config.guidance_candidates
    check_output_dir(Path(config.output_dir) / "picked", "sampling", asdict(config), {})
    candidates = generate(
        candidates_config(config, M, ref_model=config.ref_model, guidance_scale=config.guidance_scale)
    )
    if is_pipeline(config.model_name_or_path):  # RLG: the step-by-step mix is the sample; both UNets at every step
        log_weight, passes = torch.zeros(len(candidates), dtype=torch.float64), 2
    else:
        column = {
            name: torch.tensor(candidates[name], dtype=torch.float64) for name in ("ref_logprob", "model_logprob")
        }
        proposal = torch.tensor(candidates["proposal_logprob"], dtype=torch.float64)
        log_weight = guidance_log_weights(
            column["ref_logprob"], column["model_logprob"], proposal, config.guidance_scale
        )
        passes = 4  # both models run on every sampled token, then both read it teacher-forced
    picked = pick_dataset(candidates, log_weight, M, config.num_picks, config.seed)
    return save_picks(
        with_costs(picked, candidates, config, M, passes, False), config, Path(config.output_dir) / "candidates"
    )


def cfg_best_of_n(config: SampleConfig) -> Dataset:
    """N samples of p(x|c) per pick, each with its estimate of log p(c|x) (`classified/`), one picked ∝ p(c|x)^w."""
    root = Path(config.output_dir)
    check_output_dir(root / "picked", "sampling", asdict(config), {})
    generate(candidates_config(config, config.cfg_best_of_n))
    classified = classify(
        root / "candidates", root / "classified", config.model_name_or_path, config.null_class,
        config.classifier_estimates, config.seed, config.batch_size, config.dtype,
    )  # fmt: skip
    log_weight = config.cfg_scale * torch.tensor(classified["class_log_ratio"], dtype=torch.float64)
    picked = pick_dataset(classified, log_weight, config.cfg_best_of_n, config.num_picks, config.seed)
    costs = with_costs(
        picked, classified, config, config.cfg_best_of_n, 1, False, extra_passes=2 * config.classifier_estimates
    )
    return save_picks(costs, config, root / "classified")


def energy_guided(config: SampleConfig) -> Dataset:
    """ETS over the prompts, in shards that are written at once and resumed (`rlfree.lm.energy`)."""
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
    settings = (
        asdict(config)
        | {
            "sampler": config.sampler,
            "num_prompts": len(prompts.texts),
            "prompts_fingerprint": content_fingerprint(config.prompts),
            "reward_fingerprints": reward_fingerprints(config),
        }
        | {"model_stamp": folder_stamp(config.model_name_or_path)}
    )

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
    def functions() -> list[Callable]:
        models = [RewardModel(path, config.trust_remote_code, state.device) for path in config.reward_model]
        return reward_functions + models

    @functools.cache
    def search() -> EnergySearch:
        load = functools.partial(load_causal_lm, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
        reference = load(config.model_name_or_path, device=state.device)
        eos = eos_token_ids(reference, tokenizer)
        backend = load_backend(
            BackendModel(config.model_name_or_path, config.dtype, config.trust_remote_code, lambda: reference),
            config,
            eos,
        )
        rollout_model = rollout_backend = None
        if config.rollout_model is not None:
            rollout_model = load(config.rollout_model, device=state.device)
            rollout_tokenizer = load_tokenizer(config.rollout_model, config.trust_remote_code)
            check_same_tokens(
                config.rollout_model, rollout_model, rollout_tokenizer, config.model_name_or_path, reference, tokenizer
            )
            rollout_backend = load_backend(
                BackendModel(config.rollout_model, config.dtype, config.trust_remote_code, lambda: rollout_model),
                config,
                eos,
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return EnergySearch(
            backend, reference, config, pad, score_completions, config.beta, config.block_size,
            config.num_candidates, config.num_rollouts, rollout_backend, rollout_model, config.rollout_log_ratio_clip,
        )  # fmt: skip

    def make_shard(positions: range) -> Dataset:
        shard = {prompts.sampled[i]: prompts.prompt_ids[prompts.sampled[i]] for i in positions}
        rows = []
        for group in search().run(shard, config.num_picks, config.seed):
            p = group.prompt_index
            cost = group.cost
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
            search().backend.close()
            if search().rollout_backend is not None:
                search().rollout_backend.close()


# One entry per sampler: the flag that selects it is read by `SampleConfig.sampler`.
SAMPLERS: dict[str, Callable[[SampleConfig], Dataset]] = {
    "soft_best_of_n": soft_best_of_n,
    "guided": guided,
    "energy_guided": energy_guided,
    "cfg_best_of_n": cfg_best_of_n,
}


def sample(config: SampleConfig) -> Dataset:
    return SAMPLERS[config.sampler](config)


def sample_command(config: SampleConfig) -> str:
    return f"wrote {len(sample(config))} picked completions to {config.output_dir}/picked"
