"""`rlfree generate` records exactly what was sampled, with exact log-probabilities under pi_ref and the sampler."""

from __future__ import annotations

import collections
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlfree import toy
from rlfree.lm.backends.hf import HFBackend
from rlfree.stages.generate import generate
from tests.helpers import assert_same_rows


@pytest.fixture
def generate_toy(generate_config, tmp_path):
    """`generate_toy(output="gen", **overrides)`: `rlfree generate` on the toy into tmp_path/output, 16 samples per
    prompt, seed 0, batches of 24 unless overridden; returns the dataset."""

    def run(output="gen", **overrides):
        return generate(
            generate_config(tmp_path / output, **{"num_samples": 16, "seed": 0, "batch_size": 24} | overrides)
        )

    return run


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_columns_and_exact_ref_logprob(reference_dir, generate_toy):
    dataset = generate_toy()
    expected = {
        "prompt", "prompt_index", "sample_index", "completion", "prompt_ids", "completion_ids", "ref_logprob",
        "proposal_logprob", "num_tokens", "finish_reason", "answer",
    }  # fmt: skip
    assert set(dataset.column_names) == expected
    assert len(dataset) == 4 * 16
    assert sorted(collections.Counter(dataset["prompt_index"]).values()) == [16] * 4
    model = _model(reference_dir)
    for row in dataset:
        exact = toy.completion_logprobs(model, row["prompt_ids"], [row["completion_ids"]])[0].item()
        assert row["ref_logprob"] == pytest.approx(exact, abs=1e-4)
        # Sampling at temperature 1 with no filtering: the sampler is pi_ref itself.
        assert row["proposal_logprob"] == row["ref_logprob"]


def test_completion_ids_keep_eos_and_report_finish_reason(generate_toy):
    dataset = generate_toy(max_new_tokens=2, num_samples=32)
    eos = toy.build_tokenizer().eos_token_id
    reasons = collections.Counter(dataset["finish_reason"])
    assert reasons["stop"] > 0 and reasons["length"] > 0, reasons
    for row in dataset:
        ids = row["completion_ids"]
        assert row["num_tokens"] == len(ids)
        if row["finish_reason"] == "stop":
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert len(ids) == 2 and eos not in ids
        assert row["completion"] == toy.build_tokenizer().decode(ids, skip_special_tokens=True)


def test_seeded(generate_toy):
    first = generate_toy("a", seed=3)["completion_ids"]
    again = generate_toy("b", seed=3)["completion_ids"]
    other = generate_toy("c", seed=4)["completion_ids"]
    assert first == again
    assert first != other


def _tempered_logprob(model, prompt_ids, completion_ids, temperature, top_k):
    """log p(o|q) of a temperature + top-k sampler (top_k=0: no filtering), written out step by step."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0].double() / temperature
    total = 0.0
    for step, token in enumerate(completion_ids):
        row = logits[len(prompt_ids) - 1 + step]
        if top_k:
            kth = row.topk(top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        total += row.log_softmax(-1)[token].item()
    return total


def test_proposal_logprob_is_the_sampler_actually_used(reference_dir, generate_toy):
    dataset = generate_toy(temperature=0.7, top_k=5)
    model = _model(reference_dir)
    for row in dataset:
        expected = _tempered_logprob(model, row["prompt_ids"], row["completion_ids"], 0.7, 5)
        assert row["proposal_logprob"] == pytest.approx(expected, abs=1e-4)
        exact_ref = toy.completion_logprobs(model, row["prompt_ids"], [row["completion_ids"]])[0].item()
        assert row["ref_logprob"] == pytest.approx(exact_ref, abs=1e-4)
    assert any(abs(a - b) > 1e-3 for a, b in zip(dataset["proposal_logprob"], dataset["ref_logprob"], strict=True))


@pytest.fixture(scope="module")
def other_model_dir(save_toy_model):
    """A proposal that is not pi_ref: the toy model from another seed, trained far less, same tokenizer."""
    return save_toy_model("other-model", seed=1, train_steps=30)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ref_model_equal_to_the_sampled_model_changes_nothing(reference_dir, temperature, generate_toy):
    plain = generate_toy("plain", temperature=temperature)
    forced = generate_toy("forced", temperature=temperature, teacher_forced_logprobs=True)
    with_ref = generate_toy("ref", temperature=temperature, ref_model=str(reference_dir))
    assert with_ref.to_list() == forced.to_list()
    # Without --teacher_forced_logprobs, at temperature 1 the log-probabilities come from the sampling pass: the same
    # samples, the same values to KV-cache rounding.
    columns = ("ref_logprob", "proposal_logprob")
    assert plain.remove_columns(list(columns)).to_list() == forced.remove_columns(list(columns)).to_list()
    for column in columns:
        assert plain[column] == pytest.approx(forced[column], abs=1e-5)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 5)], ids=["plain", "tempered"])
def test_sampling_from_another_model(reference_dir, other_model_dir, temperature, top_k, generate_toy):
    """ref_logprob is pi_ref's, proposal_logprob the other model's under the warpers, over the same ids."""
    dataset = generate_toy(
        model_name_or_path=other_model_dir, ref_model=str(reference_dir), temperature=temperature, top_k=top_k
    )
    reference, sampler = _model(reference_dir), _model(other_model_dir)
    for row in dataset:
        prompt_ids, completion_ids = row["prompt_ids"], row["completion_ids"]
        exact_ref = toy.completion_logprobs(reference, prompt_ids, [completion_ids])[0].item()
        assert row["ref_logprob"] == pytest.approx(exact_ref, abs=1e-4)
        exact_proposal = _tempered_logprob(sampler, prompt_ids, completion_ids, temperature, top_k)
        assert row["proposal_logprob"] == pytest.approx(exact_proposal, abs=1e-4)
    gaps = [abs(a - b) for a, b in zip(dataset["proposal_logprob"], dataset["ref_logprob"], strict=True)]
    assert max(gaps) > 0.1  # the two models really differ, so a swap or a shared pass would fail above


def test_samples_do_not_depend_on_batch_or_shard_size(tmp_path, shard_config):
    small = generate(shard_config(tmp_path / "a", batch_size=1, shard_size=1))
    large = generate(shard_config(tmp_path / "b", batch_size=64, shard_size=3))
    assert_same_rows(small.to_list(), large.to_list())
    other_seed = generate(shard_config(tmp_path / "c", seed=6))
    assert other_seed["completion_ids"] != small["completion_ids"]


def test_a_changed_model_folder_restarts_an_unfinished_generation(
    reference_dir, generate_config, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "model"
    shutil.copytree(reference_dir, model)
    calls = []

    def fail_on_second(*args, **kwargs):
        if calls:
            raise RuntimeError("out of memory")
        calls.append(1)
        return original(*args, **kwargs)

    original = HFBackend.draw
    monkeypatch.setattr(HFBackend, "draw", fail_on_second)
    config = generate_config(tmp_path / "out", model_name_or_path=model, num_samples=2, shard_size=2)
    with pytest.raises(RuntimeError):
        generate(config)
    monkeypatch.undo()
    weights = model / "model.safetensors"
    os.utime(weights, (weights.stat().st_mtime + 10, weights.stat().st_mtime + 10))  # retrained since
    capsys.readouterr()
    generate(config)
    assert (
        "discarding an unfinished run's 1 shard(s), computed with other settings (model_stamp:"
        in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "out" / "generation.json").read_text())["model_stamp"] == weights.stat().st_mtime
