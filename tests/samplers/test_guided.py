"""Guided sampling (`rlfree sample --guidance_scale`) against exact answers on the enumerable toy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.stages.sample import SampleConfig, sample
from tests.helpers import exact_draw_tv, histogram, outcomes, sequence_mix, token_level_mix, total_variation

REWARD = "rlfree.toy:arithmetic_reward"


@pytest.fixture
def guided_config(sample_config, reference_dir):
    """`guided_config(tuned, output_dir, **overrides)`: sample_config mixing the model `tuned` with pi_ref
    (--ref_model), one candidate per pick, batches of 2048, seed 0."""

    def make(tuned, output_dir, **overrides):
        settings = {"batch_size": 2048, "seed": 0, "guidance_candidates": 1} | overrides
        return sample_config(output_dir, model_name_or_path=tuned, ref_model=reference_dir, **settings)

    return make


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_scale_zero_is_pi_ref_and_one_is_the_tuned_model(tuned_dir, guided_config, tmp_path, scale):
    picked = sample(guided_config(tuned_dir, tmp_path / "out", guidance_scale=scale, num_picks=8))
    column = "ref_logprob" if scale == 0 else "model_logprob"
    for row in picked:
        assert row["proposal_logprob"] == pytest.approx(row[column], abs=1e-4)
        assert row["pick_probability"] == 1.0  # one candidate per pick: plain token-level mixing


@pytest.fixture(scope="module")
def nearby_dir(save_toy_model):
    """A 'tuned' model from pi_ref's own seed and data with more correct answers: near pi_ref, as a fine-tune is."""
    return save_toy_model("nearby", seed=0, correct_fraction=0.65)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_exact_guided_picks_follow_the_sequence_level_mix(nearby_dir, exact_pair, guided_config, tmp_path, scale):
    """M = 16 reweighted candidates per pick: as close to pi_ref^(1-w)·pi_theta^w as exact draws of the same size.

    Picking one of M importance-weighted candidates is exact only as M outgrows 1 + chi^2(mix || token-level mix).
    Extrapolating (w > 1) can make that huge on some prompts (thousands here), so the bound is asserted where M is at
    least four times it, and elsewhere the picks must do no worse than token-level mixing (by more than the bound).
    """
    num_picks = 400
    config = guided_config(
        nearby_dir, tmp_path / "out", guidance_scale=scale, guidance_candidates=16, num_picks=num_picks
    )
    picked = sample(config)
    nearby = dict(
        exact_pair, models=exact_pair["models"] | {"tuned": AutoModelForCausalLM.from_pretrained(nearby_dir).eval()}
    )
    nearby["tuned"] = torch.stack(
        [
            toy.completion_logprobs(
                nearby["models"]["tuned"], exact_pair["tokenizer"](prompt)["input_ids"], exact_pair["completions"]
            )  # fmt: skip
            for prompt in exact_pair["prompts"]
        ]
    )
    target, mix = sequence_mix(nearby, scale), token_level_mix(nearby, scale)
    chi_square = (2 * target - mix).logsumexp(-1).exp()  # 1 + chi^2(target || token-level mix), exact
    sidecar = json.loads((tmp_path / "out" / "picked" / "sampling.json").read_text())
    assert sidecar["sampler"] == "guided" and sidecar["cost"]["per_pick"]["sequences"] == 16
    asserted = 0
    for prompt_index in range(len(exact_pair["prompts"])):
        probs = target[prompt_index].exp()
        tv = total_variation(histogram(outcomes(exact_pair, picked, prompt_index), len(probs)), probs)
        bound = exact_draw_tv(probs, num_picks)
        token_level = total_variation(mix[prompt_index].exp(), probs)
        print(
            f"w={scale} prompt {prompt_index}: 1+chi2 {chi_square[prompt_index]:.3g}, picks TV {tv:.4f} (exact draw "
            f"bound {bound:.4f}); token-level mixing's own TV {token_level:.4f}"
        )
        if 4 * chi_square[prompt_index] <= 16:
            assert tv <= bound, (prompt_index, tv, bound)
            asserted += 1
        else:
            assert tv <= token_level + bound, (prompt_index, tv, token_level)
    assert asserted >= 2


def test_guidance_flags_are_checked(tuned_dir, prompts_file, guided_config, tmp_path):
    with pytest.raises(StageInputError, match="--guidance_scale must be finite and >= 0"):
        guided_config(tuned_dir, tmp_path, guidance_scale=-0.5)
    with pytest.raises(StageInputError, match="--backend hf only"):
        guided_config(tuned_dir, tmp_path, guidance_scale=1.5, backend="vllm")
    with pytest.raises(StageInputError, match="uses no reward"):
        guided_config(tuned_dir, tmp_path, guidance_scale=1.5, reward=[REWARD])
    with pytest.raises(StageInputError, match="choose one sampler"):
        guided_config(tuned_dir, tmp_path, guidance_scale=1.5, soft_best_of_n=4)
    with pytest.raises(StageInputError, match="--ref_model"):
        SampleConfig(str(tuned_dir), str(prompts_file), str(tmp_path), guidance_scale=1.5)
