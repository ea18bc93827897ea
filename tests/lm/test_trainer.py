"""The trainer maximizes sum_i w_i log pi(o_i|q) over the generated ids, normalized once per optimizer step, and
forms micro-batches by length on request."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from rlfree import toy
from rlfree.lm.trainer import RLFreeTrainer, WeightedCollator
from rlfree.stages.train import train
from rlfree.training import ModelConfig
from tests.helpers import ROWS, random_rows, tiny_llama, training_args, varied_rows, write_weighted


def _logprob(model, prompt_ids, completion_ids):
    return toy.completion_logprobs(model, prompt_ids, [completion_ids])[0].item()


def test_loss_is_weighted_sum_of_sequence_logprobs(reference_dir, tmp_path):
    args = training_args(
        tmp_path, write_weighted(tmp_path, ROWS), per_device_train_batch_size=5, gradient_accumulation_steps=2
    )
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
    dataset_dir = write_weighted(tmp_path, rows, name=name)
    args = training_args(
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
    args = training_args(
        tmp_path, write_weighted(tmp_path, rows), learning_rate=1e-2, max_steps=5, per_device_train_batch_size=8
    )
    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    before_ids = _logprob(model, [3, 12, 4, 13], [3, 4, 0])
    RLFreeTrainer(model, args, Dataset.from_list(rows), toy.build_tokenizer()).train()
    after_ids = _logprob(model, [3, 12, 4, 13], [3, 4, 0])
    after_text = _logprob(model, [3, 12, 4, 13], [9, 9, 0])
    # "1 2 <eos>" is learned and stays far likelier than the text's tokens; re-tokenizing would reverse both.
    assert after_ids > before_ids + 1.0, (before_ids, after_ids)
    assert after_ids > after_text + 3.0, (after_ids, after_text)


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_sampling_strategies_train_and_save_a_loadable_model(reference_dir, tmp_path, strategy):
    out = tmp_path / "model"
    rows = varied_rows(16)
    args = training_args(
        tmp_path, write_weighted(tmp_path, rows), output_dir=str(out), train_sampling_strategy=strategy, max_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-2,
    )  # fmt: skip
    trainer = train(ModelConfig(model_name_or_path=str(reference_dir)), args)
    assert trainer.state.global_step == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert not torch.equal(reloaded.lm_head.weight, reference.lm_head.weight)
    assert (out / "README.md").is_file()


def test_group_by_length_batches_rows_of_similar_length(tmp_path):
    rows = varied_rows(64)

    def padding(strategy: str) -> int:
        args = training_args(
            tmp_path, write_weighted(tmp_path, rows, name=strategy), train_sampling_strategy=strategy,
            per_device_train_batch_size=4,
        )  # fmt: skip
        trainer = RLFreeTrainer(tiny_llama(), args, Dataset.from_list(rows), toy.build_tokenizer())
        batches = list(trainer.get_train_dataloader())
        assert sum(len(batch["weight"]) for batch in batches) == len(rows)
        return sum(int((batch["attention_mask"] == 0).sum()) for batch in batches)

    assert padding("group_by_length") < 0.5 * padding("random")


def test_length_column_counts_the_tokens_the_collator_keeps(tmp_path):
    rows = random_rows([(3, 10), (6, 1), (8, 4)])
    args = training_args(
        tmp_path, write_weighted(tmp_path, rows), train_sampling_strategy="group_by_length", max_length=7
    )
    trainer = RLFreeTrainer(tiny_llama(), args, Dataset.from_list(rows), toy.build_tokenizer())
    assert trainer.train_dataset["length"] == [7, 7, 8]  # completions are cut to max_length, prompts never
    batch = WeightedCollator(0, 1.0, max_length=7)([trainer.train_dataset[i] for i in range(3)])
    assert batch["attention_mask"].sum(-1).tolist() == [7, 7, 8]
