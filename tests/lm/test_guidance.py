"""Token-level guidance: candidates carry the exact mix and both models' log-probabilities."""

from __future__ import annotations

import torch

from rlfree.stages.generate import generate
from tests.helpers import outcomes, sequence_mix, token_level_mix, total_variation


def test_guided_candidates_carry_the_exact_mix_and_both_models_log_probabilities(
    reference_dir, tuned_dir, generate_config, exact_pair, tmp_path
):
    scale = 2.0
    config = generate_config(
        tmp_path / "candidates", model_name_or_path=tuned_dir, ref_model=reference_dir, guidance_scale=scale,
        num_samples=64, batch_size=256,
    )  # fmt: skip
    candidates = generate(config)
    mix = token_level_mix(exact_pair, scale)
    for prompt_index in range(len(exact_pair["prompts"])):
        rows = [r for r in candidates if r["prompt_index"] == prompt_index]
        index = outcomes(exact_pair, candidates, prompt_index)
        for column, values in (("proposal_logprob", mix), ("ref_logprob", exact_pair["ref"]), ("model_logprob", exact_pair["tuned"])):  # fmt: skip
            recorded = torch.tensor([r[column] for r in rows], dtype=torch.float64)
            torch.testing.assert_close(recorded, values[prompt_index][index], atol=1e-4, rtol=0)
    # The token-level mix is a different distribution from the sequence-level one: that is why picks reweight.
    assert total_variation(mix.exp()[0], sequence_mix(exact_pair, scale).exp()[0]) > 0.01
