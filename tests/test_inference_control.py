"""Guided and energy-guided sampling against exact answers on the enumerable toy (`rlfree sample`)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.lm.energy import EnergySearch
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.sample import SampleConfig, sample

REWARD = "rlfree.toy:arithmetic_reward"
MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tuned_dir(save_toy_model):
    """A second toy model, more often right: the 'tuned' side of the mix (any model serves to test the mixing)."""
    return save_toy_model("tuned", seed=1, correct_fraction=0.8)


@pytest.fixture(scope="module")
def exact(reference_dir, tuned_dir, prompts_file) -> dict:
    """Every completion's exact log pi_ref, log pi_theta and reward, and how to index them."""
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in (("ref", reference_dir), ("tuned", tuned_dir))}  # fmt: skip
    ref = toy.exact_distributions(models["ref"], tokenizer, prompts, MAX_NEW_TOKENS)
    tuned = toy.exact_distributions(models["tuned"], tokenizer, prompts, MAX_NEW_TOKENS)
    return {
        "completions": ref["completions"],
        "index": {tuple(c): i for i, c in enumerate(ref["completions"])},
        "ref": ref["logprobs"],
        "tuned": tuned["logprobs"],
        "rewards": ref["rewards"],
        "models": models,
        "tokenizer": tokenizer,
        "prompts": prompts,
    }


def token_level_mix(exact: dict, scale: float) -> torch.Tensor:
    """Exact log p_mix(o|q) of the token-level mix softmax((1-w)·log_softmax(ref) + w·log_softmax(tuned)) per step.

    Written out here on the enumeration: the reference model's step log-probabilities are read beside the tuned
    model's through toy.completion_logprobs' warper hook.
    """
    rows = []
    for prompt in exact["prompts"]:
        prompt_ids = exact["tokenizer"](prompt)["input_ids"]

        def mix(input_ids, scores, prompt_length):
            ref = exact["models"]["ref"](input_ids=input_ids).logits[:, prompt_length - 1 :].double()
            ref = ref.log_softmax(-1).flatten(0, 1)
            return (1 - scale) * ref + scale * scores.log_softmax(-1)

        with torch.no_grad():
            rows.append(toy.completion_logprobs(exact["models"]["tuned"], prompt_ids, exact["completions"], processors=[functools.partial(mix, prompt_length=len(prompt_ids))]))  # fmt: skip
    return torch.stack(rows)


def sequence_mix(exact: dict, scale: float) -> torch.Tensor:
    """Exact log of the sequence-level mix pi_ref^(1-w)·pi_theta^w, normalized over every completion."""
    return ((1 - scale) * exact["ref"] + scale * exact["tuned"]).log_softmax(-1)


def outcomes(exact: dict, dataset, prompt_index: int) -> torch.Tensor:
    return torch.tensor([exact["index"][tuple(r["completion_ids"])] for r in dataset if r["prompt_index"] == prompt_index])  # fmt: skip


def histogram(indices: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = torch.ones(len(indices), dtype=torch.float64) if weights is None else weights
    counts = torch.zeros(size, dtype=torch.float64).index_add(0, indices, weights)
    return counts / counts.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def exact_draw_tv(probs: torch.Tensor, size: int, draws: int = 50) -> float:
    """Mean + 4 sd of the TV that exact draws of `size` samples from `probs` have to it."""
    generator = torch.Generator().manual_seed(0)
    tvs = torch.tensor(
        [
            total_variation(histogram(torch.multinomial(probs, size, True, generator=generator), len(probs)), probs)
            for _ in range(draws)
        ]
    )
    return float(tvs.mean() + 4 * tvs.std())


def guided_config(reference_dir, tuned_dir, prompts_file, output_dir, **overrides) -> SampleConfig:
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 2048, "seed": 0, "guidance_candidates": 1} | overrides
    return SampleConfig(
        model_name_or_path=str(tuned_dir),
        ref_model=str(reference_dir),
        prompts=str(prompts_file),
        output_dir=str(output_dir),
        **settings,
    )


def test_guided_candidates_carry_the_exact_mix_and_both_models_log_probabilities(
    reference_dir, tuned_dir, prompts_file, exact, tmp_path
):
    scale = 2.0
    candidates = generate(
        GenerateConfig(
            str(tuned_dir), str(prompts_file), str(tmp_path / "candidates"), ref_model=str(reference_dir),
            guidance_scale=scale, num_samples=64, max_new_tokens=MAX_NEW_TOKENS, batch_size=256,
        )
    )  # fmt: skip
    mix = token_level_mix(exact, scale)
    for prompt_index in range(len(exact["prompts"])):
        rows = [r for r in candidates if r["prompt_index"] == prompt_index]
        index = outcomes(exact, candidates, prompt_index)
        for column, values in (("proposal_logprob", mix), ("ref_logprob", exact["ref"]), ("model_logprob", exact["tuned"])):  # fmt: skip
            recorded = torch.tensor([r[column] for r in rows], dtype=torch.float64)
            torch.testing.assert_close(recorded, values[prompt_index][index], atol=1e-4, rtol=0)
    # The token-level mix is a different distribution from the sequence-level one: that is why picks reweight.
    assert total_variation(mix.exp()[0], sequence_mix(exact, scale).exp()[0]) > 0.01


def test_a_lora_adapter_guides_against_its_own_base_with_one_set_of_weights(reference_dir, prompts_file, tmp_path):
    """--model_name_or_path ADAPTER --ref_model BASE: pi_ref is the adapted model with its adapter off (no second copy
    of the base), and every candidate and log-probability equals guidance between the merged model and the base."""
    from peft import LoraConfig, get_peft_model

    from rlfree.lm.modeling import AdapterOff, load_causal_lm, load_reference

    torch.manual_seed(0)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(reference_dir),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),  # a random, non-zero adapter
    )
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(reference_dir).save_pretrained(tmp_path / "merged")

    model = load_causal_lm(str(tmp_path / "adapter"))
    shared = load_reference(str(reference_dir), model, str(tmp_path / "adapter"), "auto", False, model.device)
    assert isinstance(shared, AdapterOff) and shared.model is model
    own = load_reference(str(reference_dir), merged, str(tmp_path / "merged"), "auto", False, merged.device)
    assert not isinstance(own, AdapterOff)

    datasets = {
        name: generate(
            GenerateConfig(
                str(tmp_path / name),
                str(prompts_file),
                str(tmp_path / f"{name}_out"),
                ref_model=str(reference_dir),
                guidance_scale=2.0,
                num_samples=32,
                max_new_tokens=MAX_NEW_TOKENS,
                batch_size=64,
            )
        )  # fmt: skip
        for name in ("adapter", "merged")
    }
    adapter, merged = datasets["adapter"], datasets["merged"]
    assert adapter["completion_ids"] == merged["completion_ids"]
    for column in ("ref_logprob", "model_logprob", "proposal_logprob"):
        torch.testing.assert_close(torch.tensor(adapter[column]), torch.tensor(merged[column]), atol=1e-4, rtol=0)
    # The adapter changes the model: guidance is not sampling pi_ref by accident.
    assert max(abs(a - b) for a, b in zip(adapter["ref_logprob"], adapter["model_logprob"], strict=True)) > 0.1


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_scale_zero_is_pi_ref_and_one_is_the_tuned_model(reference_dir, tuned_dir, prompts_file, tmp_path, scale):  # fmt: skip
    picked = sample(guided_config(reference_dir, tuned_dir, prompts_file, tmp_path / "out", guidance_scale=scale, num_picks=8))  # fmt: skip
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
def test_exact_guided_picks_follow_the_sequence_level_mix(reference_dir, nearby_dir, prompts_file, exact, tmp_path, scale):  # fmt: skip
    """M = 16 reweighted candidates per pick: as close to pi_ref^(1-w)·pi_theta^w as exact draws of the same size.

    Picking one of M importance-weighted candidates is exact only as M outgrows 1 + chi^2(mix || token-level mix).
    Extrapolating (w > 1) can make that huge on some prompts (thousands here), so the bound is asserted where M is at
    least four times it, and elsewhere the picks must do no worse than token-level mixing (by more than the bound).
    """
    num_picks = 400
    picked = sample(
        guided_config(
            reference_dir, nearby_dir, prompts_file, tmp_path / "out", guidance_scale=scale, guidance_candidates=16,
            num_picks=num_picks,
        )
    )  # fmt: skip
    nearby = dict(exact, models=exact["models"] | {"tuned": AutoModelForCausalLM.from_pretrained(nearby_dir).eval()})
    nearby["tuned"] = torch.stack(
        [
            toy.completion_logprobs(
                nearby["models"]["tuned"], exact["tokenizer"](prompt)["input_ids"], exact["completions"]
            )  # fmt: skip
            for prompt in exact["prompts"]
        ]
    )
    target, mix = sequence_mix(nearby, scale), token_level_mix(nearby, scale)
    chi_square = (2 * target - mix).logsumexp(-1).exp()  # 1 + chi^2(target || token-level mix), exact
    sidecar = json.loads((tmp_path / "out" / "picked" / "sampling.json").read_text())
    assert sidecar["sampler"] == "guided" and sidecar["cost"]["per_pick"]["sequences"] == 16
    asserted = 0
    for prompt_index in range(len(exact["prompts"])):
        probs = target[prompt_index].exp()
        tv = total_variation(histogram(outcomes(exact, picked, prompt_index), len(probs)), probs)
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


def test_guidance_flags_are_checked(reference_dir, tuned_dir, prompts_file, tmp_path):
    with pytest.raises(StageInputError, match="--guidance_scale must be finite and >= 0"):
        guided_config(reference_dir, tuned_dir, prompts_file, tmp_path, guidance_scale=-0.5)
    with pytest.raises(StageInputError, match="--backend hf only"):
        guided_config(reference_dir, tuned_dir, prompts_file, tmp_path, guidance_scale=1.5, backend="vllm")
    with pytest.raises(StageInputError, match="uses no reward"):
        guided_config(reference_dir, tuned_dir, prompts_file, tmp_path, guidance_scale=1.5, reward=[REWARD])
    with pytest.raises(StageInputError, match="choose one sampler"):
        guided_config(reference_dir, tuned_dir, prompts_file, tmp_path, guidance_scale=1.5, soft_best_of_n=4)
    with pytest.raises(StageInputError, match="--ref_model"):
        SampleConfig(str(tuned_dir), str(prompts_file), str(tmp_path), guidance_scale=1.5)


def energy_config(reference_dir, prompts_file, output_dir, **overrides) -> SampleConfig:
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 4096, "seed": 0, "beta": 0.5} | overrides
    return SampleConfig(
        model_name_or_path=str(reference_dir),
        prompts=str(prompts_file),
        output_dir=str(output_dir),
        reward=[REWARD],
        **settings,
    )


def test_one_block_of_energy_guided_sampling_is_soft_best_of_m(reference_dir, prompts_file, tmp_path):
    """A block as long as the completion: the energy is exp(r/beta) itself, and the picks are soft best-of-M's."""
    settings = {"num_picks": 6, "shard_size": 3}
    ets = sample(
        energy_config(
            reference_dir, prompts_file, tmp_path / "ets", energy_guided=True, block_size=MAX_NEW_TOKENS,
            num_candidates=4, num_rollouts=3, **settings,
        )
    )  # fmt: skip
    best_of_m = sample(energy_config(reference_dir, prompts_file, tmp_path / "bon", soft_best_of_n=4, **settings))
    assert ets["completion_ids"] == best_of_m["completion_ids"]
    assert ets["pick_probability"] == pytest.approx(best_of_m["pick_probability"])
    assert ets["reward"] == best_of_m["reward"]
    assert set(ets["cost_sequences"]) == {4}  # no rollouts: every candidate ends the completion


@pytest.mark.slow
def test_energy_guided_samples_approach_pi_star_as_candidates_and_rollouts_grow(reference_dir, prompts_file, exact, tmp_path):  # fmt: skip
    """Block size 1: three blocks per completion, each picked by estimated energy. TV to the exact pi* falls."""
    num_picks = 400
    target = toy.tilt(exact["ref"], exact["rewards"], 0.5).exp()
    tv = {}
    for m, k in [(2, 2), (8, 8)]:
        picked = sample(
            energy_config(
                reference_dir, prompts_file, tmp_path / f"ets-{m}-{k}", energy_guided=True, block_size=1,
                num_candidates=m, num_rollouts=k, num_picks=num_picks,
            )
        )  # fmt: skip
        tv[m, k] = [
            total_variation(histogram(outcomes(exact, picked, p), target.shape[1]), target[p])
            for p in range(len(exact["prompts"]))
        ]
        print(f"M={m} K={k}: TV to pi* per prompt {[round(value, 4) for value in tv[m, k]]}")
    bounds = [exact_draw_tv(target[p], num_picks) for p in range(len(exact["prompts"]))]
    assert all(large <= bound for large, bound in zip(tv[8, 8], bounds, strict=True)), (tv, bounds)
    assert sum(tv[8, 8]) < 0.5 * sum(tv[2, 2])


def test_energy_guided_resumes_to_the_same_picks_and_reports_rollout_clipping(
    reference_dir, tuned_dir, prompts_file, tmp_path, monkeypatch
):
    """ETS-IS with another rollout model, interrupted after two shards of one prompt and run again."""

    def config(output_dir):
        return energy_config(
            reference_dir, prompts_file, output_dir, energy_guided=True, block_size=1, num_candidates=2,
            num_rollouts=2, rollout_model=str(tuned_dir), rollout_log_ratio_clip=0.5, num_picks=2, shard_size=1,
        )  # fmt: skip

    original, calls = EnergySearch.run, []

    def run_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EnergySearch, "run", run_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sample(config(tmp_path / "out"))
    assert not (tmp_path / "out" / "picked").exists()
    assert len(list((tmp_path / "out" / "picked.partial").glob("shard-*"))) == 2
    monkeypatch.setattr(EnergySearch, "run", original)
    resumed = sample(config(tmp_path / "out"))
    uninterrupted = sample(config(tmp_path / "fresh"))
    assert resumed["completion_ids"] == uninterrupted["completion_ids"]
    sidecar = json.loads((tmp_path / "out" / "picked" / "sampling.json").read_text())
    assert 0 < sidecar["rollout_log_ratio_clipped"] <= 1  # a tight clip bites
    assert sidecar["cost"]["picks"] == len(resumed) == 8
    with pytest.raises(StageInputError, match="temperature 1"):
        energy_config(reference_dir, prompts_file, tmp_path / "x", energy_guided=True, temperature=0.7)
    with pytest.raises(StageInputError, match="--beta must be finite and > 0"):
        energy_config(reference_dir, prompts_file, tmp_path / "x", energy_guided=True, beta=0.0)
