"""Generation records exactly what was sampled, with exact log-probabilities under pi_ref and the sampler."""

from __future__ import annotations

import collections
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from rlfree import toy
from rlfree.data import StageInputError
from rlfree.stages.generate import GenerateConfig, generate


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _generate(reference_dir, prompts_file, tmp_path, **overrides):
    settings = {"num_samples": 16, "max_new_tokens": 3, "seed": 0, "batch_size": 24} | overrides
    return generate(
        GenerateConfig(
            model_name_or_path=str(reference_dir),
            prompts=str(prompts_file),
            output_dir=str(tmp_path / "gen"),
            **settings,
        )
    )


def test_columns_and_exact_ref_logprob(reference_dir, prompts_file, tmp_path):
    dataset = _generate(reference_dir, prompts_file, tmp_path)
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


def test_completion_ids_keep_eos_and_report_finish_reason(reference_dir, prompts_file, tmp_path):
    dataset = _generate(reference_dir, prompts_file, tmp_path, max_new_tokens=2, num_samples=32)
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


def test_seeded(reference_dir, prompts_file, tmp_path):
    first = _generate(reference_dir, prompts_file, tmp_path / "a", seed=3)["completion_ids"]
    again = _generate(reference_dir, prompts_file, tmp_path / "b", seed=3)["completion_ids"]
    other = _generate(reference_dir, prompts_file, tmp_path / "c", seed=4)["completion_ids"]
    assert first == again
    assert first != other


def test_checkpoint_generation_config_does_not_change_the_sampler(reference_dir, tmp_path):
    """A checkpoint shipping top_k=1, a low temperature, penalties or suppressed tokens is still sampled as pi_ref."""
    local = tmp_path / "greedy-config"
    shutil.copytree(reference_dir, local)
    GenerationConfig(
        do_sample=True,
        top_k=1,
        temperature=0.05,
        top_p=0.5,
        repetition_penalty=10.0,
        min_new_tokens=3,
        suppress_tokens=[5],
        eos_token_id=0,
        pad_token_id=0,
    ).save_pretrained(local)
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"prompt": "4 + 5 ="}) + "\n")
    dataset = generate(
        GenerateConfig(
            model_name_or_path=str(local),
            prompts=str(prompts),
            output_dir=str(tmp_path / "gen"),
            num_samples=600,
            max_new_tokens=3,
            batch_size=600,
        )
    )
    tokenizer = toy.build_tokenizer()
    exact = toy.exact_distributions(_model(reference_dir), tokenizer, ["4 + 5 ="], 3)
    index = {tuple(ids): i for i, ids in enumerate(exact["completions"])}
    counts = torch.zeros(len(index), dtype=torch.float64)
    for ids in dataset["completion_ids"]:
        counts[index[tuple(ids)]] += 1
    total_variation = 0.5 * (counts / counts.sum() - exact["logprobs"][0].exp()).abs().sum().item()
    # top_k=1 would put all 600 samples on the mode (TV = 1 - p(mode), about 0.5 here); sampling error is ~0.05.
    assert total_variation < 0.12
    assert len(set(map(tuple, dataset["completion_ids"]))) > 3


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


def test_proposal_logprob_is_the_sampler_actually_used(reference_dir, prompts_file, tmp_path):
    dataset = _generate(reference_dir, prompts_file, tmp_path, temperature=0.7, top_k=5)
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
def test_ref_model_equal_to_the_sampled_model_changes_nothing(reference_dir, prompts_file, tmp_path, temperature):
    plain = _generate(reference_dir, prompts_file, tmp_path / "plain", temperature=temperature)
    forced = _generate(
        reference_dir, prompts_file, tmp_path / "forced", temperature=temperature, teacher_forced_logprobs=True
    )
    with_ref = _generate(
        reference_dir, prompts_file, tmp_path / "ref", temperature=temperature, ref_model=str(reference_dir)
    )
    assert with_ref.to_list() == forced.to_list()
    # Without --teacher_forced_logprobs, at temperature 1 the log-probabilities come from the sampling pass: the same
    # samples, the same values to KV-cache rounding.
    columns = ("ref_logprob", "proposal_logprob")
    assert plain.remove_columns(list(columns)).to_list() == forced.remove_columns(list(columns)).to_list()
    for column in columns:
        assert plain[column] == pytest.approx(forced[column], abs=1e-5)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 5)], ids=["plain", "tempered"])
def test_sampling_from_another_model(reference_dir, other_model_dir, prompts_file, tmp_path, temperature, top_k):
    """ref_logprob is pi_ref's, proposal_logprob the other model's under the warpers, over the same ids."""
    dataset = _generate(
        other_model_dir, prompts_file, tmp_path, ref_model=str(reference_dir), temperature=temperature, top_k=top_k
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


@pytest.mark.parametrize(("mismatch", "message"), [("vocab", "different vocabularies"), ("eos", "EOS ids")])
def test_ref_model_with_other_tokens_is_rejected(reference_dir, prompts_file, tmp_path, mismatch, message):
    other = tmp_path / "other-tokens"
    shutil.copytree(reference_dir, other)
    if mismatch == "vocab":
        tokenizer = toy.build_tokenizer()
        tokenizer.add_tokens(["<extra>"])
        tokenizer.save_pretrained(other)
    else:
        GenerationConfig(eos_token_id=1, pad_token_id=0).save_pretrained(other)
    with pytest.raises(StageInputError, match=message) as error:
        _generate(other, prompts_file, tmp_path, ref_model=str(reference_dir))
    assert str(other) in str(error.value) and str(reference_dir) in str(error.value)


def test_chat_prompts_use_the_chat_template(reference_dir, tmp_path):
    local = tmp_path / "chat-model"
    shutil.copytree(reference_dir, local)
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    tokenizer.save_pretrained(local)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 3"}]}) + "\n")
    dataset = generate(
        GenerateConfig(
            model_name_or_path=str(local), prompts=str(prompts), output_dir=str(tmp_path / "gen"), num_samples=2,
            max_new_tokens=2,
        )
    )  # fmt: skip
    assert dataset[0]["prompt"] == "2 + 3 ="
    assert dataset[0]["prompt_ids"] == tokenizer("2 + 3 =")["input_ids"]
    assert "messages" in dataset.column_names


def test_bad_settings_name_the_flag(reference_dir, prompts_file, tmp_path):
    for flag, value in [("num_samples", 0), ("temperature", 0.0), ("top_p", 1.5), ("max_new_tokens", 0)]:
        with pytest.raises(ValueError, match=f"--{flag}"):
            _generate(reference_dir, prompts_file, tmp_path, **{flag: value})
