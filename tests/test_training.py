"""The trainer maximizes sum_i w_i log pi(o_i|q) over the generated ids, normalized once per optimizer step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from rlfree import toy
from rlfree.lm.trainer import RLFreeConfig, RLFreeTrainer, model_card
from rlfree.stages.train import ModelConfig, train

ROWS = [
    # prompt "1 + 2 =", completions of different lengths so a per-token mean would differ from the sum
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [5, 0], "weight": 0.7},
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [3, 4, 0], "weight": 0.2},
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [6, 6], "weight": 0.1},
    {"prompt_index": 1, "prompt_ids": [9, 12, 9, 13], "completion_ids": [3, 8, 0], "weight": 0.9},
    {"prompt_index": 1, "prompt_ids": [9, 12, 9, 13], "completion_ids": [9, 0], "weight": 0.1},
]


def _weighted_dir(tmp_path, rows, name="weighted", sidecar=None):
    path = tmp_path / name
    Dataset.from_list(rows).save_to_disk(str(path))
    if sidecar:
        (path / "weighting.json").write_text(json.dumps(sidecar))
    return path


def _args(tmp_path, dataset_dir, **overrides):
    settings = {
        "output_dir": str(tmp_path / "out"),
        "dataset_dir": str(dataset_dir),
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    } | overrides
    return RLFreeConfig(**settings)


def _logprob(model, prompt_ids, completion_ids):
    return toy.completion_logprobs(model, prompt_ids, [completion_ids])[0].item()


def test_loss_is_weighted_sum_of_sequence_logprobs(reference_dir, tmp_path):
    args = _args(tmp_path, _weighted_dir(tmp_path, ROWS), per_device_train_batch_size=5, gradient_accumulation_steps=2)
    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    trainer = RLFreeTrainer(model, args, Dataset.from_list(ROWS), toy.build_tokenizer())
    batch = trainer.data_collator(
        [{key: row[key] for key in ("prompt_ids", "completion_ids", "weight")} for row in ROWS]
    )
    loss = trainer.compute_loss(model, dict(batch)).item()
    scale = len(ROWS) / sum(row["weight"] for row in ROWS)  # rows per prompt: uniform weights would give SFT's mean
    expected = -sum(
        scale * row["weight"] * _logprob(model, row["prompt_ids"], row["completion_ids"]) for row in ROWS
    ) / (5 * 2)  # sequences in one optimizer step on this rank
    assert loss == pytest.approx(expected, rel=1e-5)


def _trained_parameters(reference_dir, tmp_path, rows, name, **overrides):
    dataset_dir = _weighted_dir(tmp_path, rows, name=name)
    args = _args(
        tmp_path / name, dataset_dir, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_steps=2,
        **overrides,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    RLFreeTrainer(model, args, Dataset.from_list(rows), toy.build_tokenizer()).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_gives_the_one_big_batch_update(reference_dir, tmp_path):
    rows = [dict(row, weight=row["weight"] * (1 + i % 3)) for i, row in enumerate(ROWS * 4)][:16]
    big = _trained_parameters(reference_dir, tmp_path, rows, "big", per_device_train_batch_size=8)
    accumulated = _trained_parameters(
        reference_dir, tmp_path, rows, "accumulated", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    untouched = torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(reference_dir).parameters()])
    assert (big - untouched).abs().max() > 1e-3  # the steps did move the weights
    torch.testing.assert_close(accumulated, big, atol=2e-6, rtol=0)


def test_trains_on_generated_ids_not_on_the_text(reference_dir, tmp_path):
    """The `completion` text says "7 7" but the ids are "1 2 <eos>": only the ids may be learned."""
    rows = [
        {"prompt_index": 0, "prompt": "1 + 2 =", "prompt_ids": [3, 12, 4, 13], "completion": "7 7",
         "completion_ids": [3, 4, 0], "weight": 1.0}
    ] * 8  # fmt: skip
    args = _args(
        tmp_path, _weighted_dir(tmp_path, rows), learning_rate=1e-2, max_steps=5, per_device_train_batch_size=8
    )
    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    before_ids = _logprob(model, [3, 12, 4, 13], [3, 4, 0])
    RLFreeTrainer(model, args, Dataset.from_list(rows), toy.build_tokenizer()).train()
    after_ids = _logprob(model, [3, 12, 4, 13], [3, 4, 0])
    after_text = _logprob(model, [3, 12, 4, 13], [9, 9, 0])
    # "1 2 <eos>" is learned and stays far likelier than the text's tokens; re-tokenizing would reverse both.
    assert after_ids > before_ids + 1.0, (before_ids, after_ids)
    assert after_ids > after_text + 3.0, (after_ids, after_text)


def test_checkpoint_is_sft_style_with_model_card(reference_dir, tmp_path):
    sidecar = {"weighting": "rlhf", "beta": 0.37, "num_prompts": 2, "ess_min": 1.5, "ess_median": 1.7}
    dataset_dir = _weighted_dir(tmp_path, ROWS, sidecar=sidecar)
    (dataset_dir / "generation.json").write_text(json.dumps({"num_samples": 3, "prompts": "my-prompts.jsonl"}))
    (dataset_dir / "scoring.json").write_text(json.dumps({"reward": ["rewards.py:exact_match"], "reward_model": []}))
    out = tmp_path / "checkpoint"
    train(
        ModelConfig(model_name_or_path=str(reference_dir)),
        _args(tmp_path, dataset_dir, output_dir=str(out), max_steps=2, learning_rate=1e-2),
    )
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    for fact in ("| weighting | rlhf |", "| beta | 0.37 |", "| samples per prompt (N) | 3 |", "exact_match",
                 "my-prompts.jsonl", f"| base model | {reference_dir.resolve()} |"):  # fmt: skip
        assert fact in card, fact
    assert "base_model:" not in card  # a local folder is no Hub id
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert not torch.equal(reloaded.lm_head.weight, reference.lm_head.weight)


@pytest.mark.parametrize("merge", [False, True])
def test_lora_saves_adapter_or_merged_model(reference_dir, tmp_path, merge):
    out = tmp_path / "lora"
    trainer = train(
        ModelConfig(
            model_name_or_path=str(reference_dir), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
            merge_lora=merge,
        ),
        _args(tmp_path, _weighted_dir(tmp_path, ROWS), output_dir=str(out), max_steps=3, learning_rate=5e-2),
    )  # fmt: skip
    assert (out / "adapter_config.json").is_file() != merge
    assert (out / "model.safetensors").is_file() == merge
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # transformers resolves an adapter folder through peft
    ids = torch.tensor([[3, 12, 4, 13, 3, 4]])
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(reference_dir)(input_ids=ids).logits
    assert (reloaded(input_ids=ids).logits - base).abs().max() > 1e-4


def test_missing_weight_column_is_a_clear_error(reference_dir, tmp_path):
    rows = [{key: value for key, value in row.items() if key != "weight"} for row in ROWS]
    with pytest.raises(ValueError, match="weight"):
        train(ModelConfig(model_name_or_path=str(reference_dir)), _args(tmp_path, _weighted_dir(tmp_path, rows)))


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(reference_dir, tmp_path, monkeypatch):
    rows = ROWS * 8  # 40 rows: 5 steps of 8
    dataset_dir = _weighted_dir(tmp_path, rows)
    flags = {"per_device_train_batch_size": 8, "max_steps": 4, "learning_rate": 0.01, "save_strategy": "steps"}
    model_config = ModelConfig(model_name_or_path=str(reference_dir))
    train(model_config, _args(tmp_path, dataset_dir, output_dir=str(tmp_path / "whole"), save_steps=2, **flags))
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")

    # A run killed after step 2: only its first checkpoint exists, and no finished model.
    train(model_config, _args(tmp_path, dataset_dir, output_dir=str(tmp_path / "killed"), save_steps=2, **flags))
    killed = tmp_path / "killed"
    for path in killed.iterdir():
        if path.name != "checkpoint-2":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    resumed_args = _args(
        tmp_path, dataset_dir, output_dir=str(killed), save_steps=2, resume_from_checkpoint="last", **flags
    )
    steps_run = []
    original_step = RLFreeTrainer.training_step
    monkeypatch.setattr(
        RLFreeTrainer, "training_step", lambda self, *a, **k: steps_run.append(1) or original_step(self, *a, **k)
    )
    trainer = train(model_config, resumed_args)
    assert trainer.state.global_step == 4
    assert len(steps_run) == 2  # steps 3 and 4 only: it really started from checkpoint-2
    resumed = AutoModelForCausalLM.from_pretrained(killed)
    for (name, expected), actual in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(actual, expected, atol=1e-6), name
    assert (killed / "training.json").is_file()


def test_resume_last_without_a_checkpoint_starts_from_step_zero(reference_dir, tmp_path):
    args = _args(tmp_path, _weighted_dir(tmp_path, ROWS), max_steps=1, resume_from_checkpoint="last")
    assert train(ModelConfig(model_name_or_path=str(reference_dir)), args).state.global_step == 1


def _card(tmp_path, name_or_path, weighting=None):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    return model_card(name_or_path, {"weighting": weighting or {"weighting": "rlhf", "beta": 0.1}}, "data", args)


def test_model_card_names_a_hub_id_but_not_a_local_folder(tmp_path, monkeypatch):
    card = _card(tmp_path, "my-org/my-model")
    assert 'base_model: "my-org/my-model"' in card and "| base model | my-org/my-model |" in card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-org" / "local-model").mkdir(parents=True)
    card = _card(tmp_path, "my-org/local-model")  # as typed: relative, and shaped like a Hub id
    assert "base_model:" not in card
    assert f"| base model | {tmp_path.resolve() / 'my-org' / 'local-model'} |" in card

    snapshot = tmp_path / "hub" / "models--my-org--cached-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    card = _card(tmp_path, str(snapshot))
    assert 'base_model: "my-org/cached-model"' in card and "| base model | my-org/cached-model |" in card


UNSET = {"beta": None, "rlif_exponent": None, "beta_if": None}  # `weighting.json` records every setting


@pytest.mark.parametrize(
    ("weighting", "shown", "hidden"),
    [
        (UNSET | {"weighting": "rlhf", "beta": 0.37}, ["| beta | 0.37 |"], ["| rlif exponent |", "| rlif beta_if |"]),
        (UNSET | {"weighting": "rlif", "rlif_exponent": 0.5}, ["| rlif exponent | 0.5 |"], ["| beta |", "beta_if"]),
        (UNSET | {"weighting": "rlif", "beta_if": 0.2}, ["| rlif beta_if | 0.2 |"], ["| beta |", "exponent"]),
        (
            UNSET | {"weighting": "rlhf+rlif", "beta": 0.37, "rlif_exponent": 0.5},
            ["| beta | 0.37 |", "| rlif exponent | 0.5 |"],
            ["beta_if"],
        ),
    ],
)
def test_model_card_shows_only_the_coefficients_of_the_weighting_used(tmp_path, weighting, shown, hidden):
    card = _card(tmp_path, "my-org/my-model", weighting)
    for row in shown:
        assert row in card, row
    for text in hidden:
        assert text not in card, text


def test_model_card_rounds_ess_and_names_rlfree_without_a_registry_link(tmp_path):
    weighting = {"weighting": "rlhf", "beta": 0.1, "ess_min": 1.2345678901, "ess_median": 12345.678}
    card = _card(tmp_path, "my-org/my-model", weighting)
    assert "| ESS min / median | 1.23 / 12300 |" in card
    assert "pypi" not in card and "with rlfree:" in card
