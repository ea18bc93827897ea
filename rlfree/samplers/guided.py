"""Guidance between the reference and a tuned model (`--guidance_scale W --ref_model REF`; RLG, DeRa).

For a family with likelihoods (LMs, `rlfree.lm.guidance`): M candidates from the token-level mix of REF and the
tuned model, one picked with weights pi_ref^(1-W)·pi_theta^W / p_mix, which reaches the sequence-level mix
(pi_ref·exp(W·r/beta) when the tuned model is the optimum at beta); M = 1 is plain token-level mixing. For a diffusion
pipeline, RLG's step-by-step mix ref + W·(model - ref) is drawn directly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset

from ..data import check_output_dir
from ..errors import StageInputError
from ..options import Options, check_guidance
from ..stages.generate import generate
from .base import Sampler, SampleSettings
from .picking import candidates_config, pick_dataset, save_picks, with_costs

DEFAULT_CANDIDATES = 8  # per pick, where the family's likelihoods allow reweighting


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


class Guided(Sampler):
    name = "guided"
    flag = "--guidance_scale"
    usage = "--guidance_scale W with --ref_model"
    options = GuidanceOptions
    uses_reward = False
    exclusive = {"ref_model": "--ref_model is the reference of --guidance_scale; the other samplers sample it"}

    def selected(self, config: SampleSettings) -> bool:
        return config.guidance_scale is not None

    def check(self, config: SampleSettings) -> None:
        check_guidance(config.guidance_scale, config.ref_model, config.backend)
        if not config.family.has_likelihood:
            if config.guidance_candidates not in (None, 1):
                raise StageInputError(
                    f"--guidance_candidates {config.guidance_candidates}: picking among candidates needs their exact "
                    "likelihoods, which a diffusion pipeline lacks; RLG's step-by-step mix is drawn directly (1)"
                )
            config.guidance_candidates = 1
        elif config.guidance_candidates is None:
            config.guidance_candidates = DEFAULT_CANDIDATES
        if config.guidance_candidates < 1:
            raise StageInputError(f"--guidance_candidates must be >= 1, got {config.guidance_candidates}")
        if config.reward or config.reward_model:
            raise StageInputError(
                "--guidance_scale uses no reward (the tuned model carries it); drop --reward/--reward_model and "
                "score the picks with `rlfree score` or `rlfree evaluate`"
            )

    def run(self, config: SampleSettings) -> Dataset:
        """M guided candidates per pick (`generate --guidance_scale`), one picked toward the sequence-level mix."""
        m = config.guidance_candidates
        check_output_dir(Path(config.output_dir) / "picked", "sampling", asdict(config), {})
        candidates = generate(
            candidates_config(config, m, ref_model=config.ref_model, guidance_scale=config.guidance_scale)
        )
        log_weight = config.family.guided_log_weights(candidates, config.guidance_scale)
        picked = pick_dataset(candidates, log_weight, m, config.num_picks, config.seed)
        # Both models run on every candidate token or step, each as the family reads a sample.
        costs = with_costs(picked, candidates, config, m, 2 * config.family.passes_per_sample, False)
        return save_picks(costs, config, self.name, Path(config.output_dir) / "candidates")

    def describe(self, settings: dict) -> str:
        return f"W={settings['guidance_scale']} M={settings['guidance_candidates']} ref {settings['ref_model']}"


GUIDED = Guided()
