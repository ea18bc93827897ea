"""Prompt rendering, context fitting and the teacher-forced pass."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import GenerationConfig

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.lm import generation
from rlfree.stages.generate import generate
from tests.helpers import generate_args, nothing_made


@pytest.mark.parametrize(("mismatch", "message"), [("vocab", "different vocabularies"), ("eos", "EOS ids")])
def test_ref_model_with_other_tokens_is_rejected(reference_dir, generate_config, tmp_path, mismatch, message):
    other = tmp_path / "other-tokens"
    shutil.copytree(reference_dir, other)
    if mismatch == "vocab":
        tokenizer = toy.build_tokenizer()
        tokenizer.add_tokens(["<extra>"])
        tokenizer.save_pretrained(other)
    else:
        GenerationConfig(eos_token_id=1, pad_token_id=0).save_pretrained(other)
    settings = {"num_samples": 16, "seed": 0, "batch_size": 24}
    with pytest.raises(StageInputError, match=message) as error:
        generate(generate_config(tmp_path / "gen", model_name_or_path=other, ref_model=reference_dir, **settings))
    assert str(other) in str(error.value) and str(reference_dir) in str(error.value)


def test_chat_prompts_use_the_chat_template(reference_dir, generate_config, tmp_path):
    local = tmp_path / "chat-model"
    shutil.copytree(reference_dir, local)
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    tokenizer.save_pretrained(local)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 3"}]}) + "\n")
    config = generate_config(
        tmp_path / "gen", model_name_or_path=local, prompts=prompts, num_samples=2, max_new_tokens=2
    )
    dataset = generate(config)
    assert dataset[0]["prompt"] == "2 + 3 ="
    assert dataset[0]["prompt_ids"] == tokenizer("2 + 3 =")["input_ids"]
    assert "messages" in dataset.column_names


def test_a_prompt_longer_than_the_context_is_named(reference_dir, long_prompts_file, tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, err = run_cli(generate_args(reference_dir, long_prompts_file, out))
    assert code == 2 and nothing_made(out)
    assert "prompt 1 has 38 tokens, but the model attends over 32 positions (max_position_embeddings)" in err
    assert "leaves room for 29" in err and "--long_prompts skip" in err


def test_max_new_tokens_beyond_the_context_is_refused(reference_dir, prompts_file, tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, err = run_cli(generate_args(reference_dir, prompts_file, out, "--max_new_tokens", 32))
    assert code == 2 and "--max_new_tokens 32 leaves no room for a prompt" in err and nothing_made(out)


def test_long_prompts_can_be_skipped_or_truncated(generate_config, long_prompts_file, tmp_path):
    config = {"prompts": long_prompts_file, "num_samples": 2}
    skipped = generate(generate_config(tmp_path / "skip", long_prompts="skip", **config))
    assert sorted(set(skipped["prompt_index"])) == [0, 2]
    cut = generate(generate_config(tmp_path / "cut", long_prompts="truncate", **config))
    lengths = {row["prompt_index"]: len(row["prompt_ids"]) for row in cut}
    assert lengths == {0: 4, 1: 29, 2: 4}
    long_row = next(row for row in cut if row["prompt_index"] == 1)
    assert long_row["prompt"].endswith("1 + 1 =") and long_row["prompt_ids"][-2:] == [3, 13]


def test_sampling_from_pi_ref_reads_its_log_softmax_once(generate_config, tmp_path, monkeypatch):
    processor_sets = []
    original = generation.model_completion_logprobs

    def spy(*args, **kwargs):
        processor_sets.append(args[4] if len(args) > 4 else (None,))
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "model_completion_logprobs", spy)
    rows = generate(generate_config(tmp_path / "forced", num_samples=2, teacher_forced_logprobs=True))
    assert processor_sets and all(len(sets) == 1 for sets in processor_sets)
    assert rows["ref_logprob"] == rows["proposal_logprob"]
    # By default the sampling pass already read it: no teacher-forced pass at all.
    processor_sets.clear()
    rows = generate(generate_config(tmp_path / "sampled", num_samples=2))
    assert processor_sets == [] and rows["ref_logprob"] == rows["proposal_logprob"]
