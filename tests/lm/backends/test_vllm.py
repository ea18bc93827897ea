"""The vLLM backend against exact answers on the enumerable toy, with the real CPU engine (`make test-vllm`).

vLLM's CPU attention needs heads of at least 32 dimensions, so the toy pi_ref here has 2 heads of 32.
"""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
import torch
from datasets import load_from_disk
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from rlfree import toy
from rlfree.evaluation.inspection import InspectConfig, inspect
from rlfree.lm.backends.vllm import VLLMBackend
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.weights import normalize_per_group
from tests.helpers import exact_draw_tv, histogram, total_variation

pytestmark = pytest.mark.vllm
MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """pi_ref with 32-dimensional heads, three prompts, and every completion's exact log pi_ref and reward."""
    root = tmp_path_factory.mktemp("vllm_task")
    model, tokenizer, rows = toy.write_task(root, num_prompts=3, seed=0, num_attention_heads=2)
    prompts = [row["prompt"] for row in rows]
    exact = toy.exact_distributions(model, tokenizer, prompts, MAX_NEW_TOKENS)
    index = {tuple(completion): i for i, completion in enumerate(exact["completions"])}
    return {"root": root, "exact": exact, "index": index, "prompts": prompts, "model": model, "tokenizer": tokenizer}


def config(task, output_dir, **overrides) -> GenerateConfig:
    # Eager: the engine starts in ~20 s instead of ~60 s of torch.compile, and samples the same.
    settings = {
        "num_samples": 2048,
        "max_new_tokens": MAX_NEW_TOKENS,
        "seed": 3,
        "backend": "vllm",
        "vllm_enforce_eager": True,
    } | overrides
    root = task["root"]
    return GenerateConfig(str(root / "reference"), str(root / "prompts.jsonl"), str(output_dir), **settings)


@pytest.fixture(scope="module")
def plain_dir(task, tmp_path_factory):
    """One vLLM run at temperature 1, shared by the tests that read it."""
    output_dir = tmp_path_factory.mktemp("plain") / "out"
    generate(config(task, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def plain(plain_dir):
    return load_from_disk(str(plain_dir))


def count_differing(a, b) -> int:
    return sum(x["completion_ids"] != y["completion_ids"] for x, y in zip(a, b, strict=True))


def outcome_indices(task, dataset, prompt_index: int) -> torch.Tensor:
    rows = [row for row in dataset if row["prompt_index"] == prompt_index]
    return torch.tensor([task["index"][tuple(row["completion_ids"])] for row in rows])


def test_samples_at_temperature_one_follow_pi_ref_and_ref_logprob_is_exact(task, plain):
    exact = task["exact"]
    for prompt_index in range(len(task["prompts"])):
        probs = exact["logprobs"][prompt_index].exp()
        indices = outcome_indices(task, plain, prompt_index)
        tv = total_variation(histogram(indices, len(probs)), probs)
        assert tv <= exact_draw_tv(probs, len(indices)), (prompt_index, tv)
        ref = torch.tensor([row["ref_logprob"] for row in plain if row["prompt_index"] == prompt_index])
        torch.testing.assert_close(ref.double(), exact["logprobs"][prompt_index][indices], atol=1e-4, rtol=0)


def test_the_dataset_has_the_hf_backends_columns(task, plain, tmp_path):
    hf = generate(config(task, tmp_path / "hf", backend="hf", num_samples=2))
    assert plain.column_names == hf.column_names
    assert set(plain["finish_reason"]) <= {"stop", "length"}
    stopped = [row for row in plain if row["finish_reason"] == "stop"]
    assert stopped and all(row["completion_ids"][-1] == toy.VOCAB.index(toy.EOS) for row in stopped)
    assert all(row["num_tokens"] == len(row["completion_ids"]) for row in plain)


def test_the_engine_mismatch_is_recorded_and_inspected(plain_dir, plain, capsys):
    gap = json.loads((plain_dir / "generation.json").read_text())["engine_mismatch"]
    assert gap["engine_gap_tokens"] == sum(plain["num_tokens"])
    # Both sides compute in float32 on the same weights: the gap is rounding, not a different distribution.
    assert 0 <= gap["engine_gap_mean"] <= gap["engine_gap_max"] < 1e-3
    # The engine's own log-probabilities are the proposal's: at temperature 1 they equal ref_logprob to rounding.
    gaps = [abs(row["proposal_logprob"] - row["ref_logprob"]) for row in plain]
    assert max(gaps) < 3e-3
    report = inspect(InspectConfig(input_dir=str(plain_dir)))
    assert report["backend"] == "vllm" and report["engine_mismatch"] == gap
    assert "engine vs pi_ref, per token" in capsys.readouterr().out


def test_tempered_top_p_samples_reweighted_reach_the_exact_target(task, tmp_path):
    """Temperature 0.7 and top-p 0.9 change what the engine samples; its processed log-probabilities undo it.

    Top-p cuts outcomes out of the proposal's support, and no weighting brings those back: the reweighted samples
    converge to pi* restricted to the support, which is the exact target here (the cut mass is printed).
    """
    beta, temperature, top_p = 2.0, 0.7, 0.9
    dataset = generate(config(task, tmp_path / "tempered", temperature=temperature, top_p=top_p, num_samples=4096))
    exact = task["exact"]
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    uncorrected_limits = []
    for prompt_index, prompt in enumerate(task["prompts"]):
        prompt_ids = task["tokenizer"](prompt)["input_ids"]
        proposal = toy.completion_logprobs(task["model"], prompt_ids, exact["completions"], processors=warpers)
        rows = [row for row in dataset if row["prompt_index"] == prompt_index]
        indices = outcome_indices(task, dataset, prompt_index)
        # The engine's proposal_logprob is the exact log-probability of its tempered, top-p-cut sampler.
        engine = torch.tensor([row["proposal_logprob"] for row in rows], dtype=torch.float64)
        torch.testing.assert_close(engine, proposal[indices], atol=1e-4, rtol=0)
        tilted = toy.tilt(exact["logprobs"][prompt_index], exact["rewards"][prompt_index], beta)
        target = tilted.masked_fill(proposal.isneginf(), -math.inf).softmax(-1)
        print(f"prompt {prompt_index}: top-p cuts {tilted[proposal.isneginf()].exp().sum():.3f} of pi*'s mass")
        reward = exact["rewards"][prompt_index][indices]
        correction = torch.tensor([row["ref_logprob"] - row["proposal_logprob"] for row in rows], dtype=torch.float64)
        corrected = normalize_per_group(reward / beta + correction, torch.zeros(len(rows), dtype=torch.long)).exp()
        tv = total_variation(histogram(indices, len(target), corrected), target)
        # An importance-weighted histogram is as good as an exact draw of its effective sample size.
        bound = exact_draw_tv(target, int(1 / corrected.square().sum()))
        # Without the correction the weights would converge to p·exp(r/beta) instead, this far from the target:
        uncorrected = total_variation((proposal + exact["rewards"][prompt_index] / beta).softmax(-1), target)
        print(f"prompt {prompt_index}: TV {tv:.4f} (bound {bound:.4f}); uncorrected limit {uncorrected:.4f}")
        assert tv < bound, (prompt_index, tv, bound)
        uncorrected_limits.append(uncorrected / bound)
    assert max(uncorrected_limits) > 1.5  # the test can tell a missing correction apart


def test_samples_do_not_depend_on_how_requests_are_batched(task, plain, tmp_path):
    """Shards of one prompt put other requests beside each sample in the engine; the samples stay the same.

    A sample may only differ where batched kernels round a near-tie the other way; such flips are counted.
    """
    one_prompt_at_a_time = generate(config(task, tmp_path / "sharded", shard_size=1, batch_size=7))
    differing = count_differing(plain, one_prompt_at_a_time)
    print(f"{differing} of {len(plain)} samples differ between engine batch compositions")
    assert differing <= len(plain) // 1000


def test_an_interrupted_run_resumes_to_the_same_dataset_and_leaves_no_engine(task, plain, tmp_path, monkeypatch):
    original, calls = VLLMBackend.draw, []

    def draw_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VLLMBackend, "draw", draw_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(config(task, tmp_path / "out", shard_size=1))
    assert not multiprocessing.active_children()  # the engine core is gone
    monkeypatch.undo()
    resumed = generate(config(task, tmp_path / "out", shard_size=1))
    assert not multiprocessing.active_children()
    assert count_differing(resumed, plain) <= len(plain) // 1000


def test_energy_guided_sampling_draws_candidates_and_rollouts_from_the_engine(task, tmp_path):
    """ETS through vLLM: one block is soft best-of-M on the same engine (same seeds, same picks); with blocks of one
    token the picks follow the same distribution as the HF backend's (ETS at finite M and K is not pi* itself, so the
    two backends are compared with each other: within twice an exact draw's TV)."""
    from rlfree.stages.sample import SampleConfig, sample

    root = task["root"]

    def run(name: str, **overrides):
        settings = {
            "max_new_tokens": MAX_NEW_TOKENS, "seed": 0, "beta": 0.5, "backend": "vllm", "vllm_enforce_eager": True,
            "reward": ["rlfree.toy:arithmetic_reward"], "batch_size": 4096,
        } | overrides  # fmt: skip
        return sample(SampleConfig(str(root / "reference"), str(root / "prompts.jsonl"), str(tmp_path / name), **settings))  # fmt: skip

    one_block = run("one_block", energy_guided=True, block_size=MAX_NEW_TOKENS, num_candidates=4, num_picks=6)
    best_of_m = run("best_of_m", soft_best_of_n=4, num_picks=6)
    assert one_block["completion_ids"] == best_of_m["completion_ids"]
    assert one_block["pick_probability"] == pytest.approx(best_of_m["pick_probability"])

    num_picks = 200
    ets = {"block_size": 1, "num_candidates": 4, "num_rollouts": 4, "num_picks": num_picks, "energy_guided": True}
    picked = {backend: run(backend, backend=backend, **ets) for backend in ("vllm", "hf")}
    # Per block, M candidates and K rollouts of each candidate that has not ended: at most 3 · (4 + 16) sequences.
    assert all(4 <= cost <= 60 for cost in picked["vllm"]["cost_sequences"])
    target = toy.tilt(task["exact"]["logprobs"], task["exact"]["rewards"], 0.5).exp()
    size = target.shape[1]
    for prompt_index in range(len(task["prompts"])):
        vllm, hf = (histogram(outcome_indices(task, picked[b], prompt_index), size) for b in ("vllm", "hf"))
        tv, bound = total_variation(vllm, hf), 2 * exact_draw_tv(target[prompt_index], num_picks)
        print(
            f"prompt {prompt_index}: TV(vLLM, HF) {tv:.4f} (bound {bound:.4f}); TV to pi* vLLM "
            f"{total_variation(vllm, target[prompt_index]):.4f}, HF {total_variation(hf, target[prompt_index]):.4f}"
        )
        assert tv <= bound, (prompt_index, tv, bound)
    # The TV bound is loose at this size; the accuracy of the picks (a 0/1 reward) is a sharp check: both backends'
    # agree within 4 standard errors, and both are far above pi_ref's exact accuracy (the energies steer).
    accuracy = {backend: torch.tensor(picked[backend]["reward"]).mean().item() for backend in picked}
    stderr = math.sqrt(2 * accuracy["hf"] * (1 - accuracy["hf"]) / len(picked["hf"]))
    ref_accuracy = (task["exact"]["logprobs"].exp() * task["exact"]["rewards"]).sum(-1).mean().item()
    print(
        f"accuracy: vLLM {accuracy['vllm']:.3f}, HF {accuracy['hf']:.3f} (stderr {stderr:.3f}), pi_ref {ref_accuracy:.3f}"
    )
    assert abs(accuracy["vllm"] - accuracy["hf"]) <= 4 * stderr
    assert min(accuracy.values()) > ref_accuracy + 5 * stderr
