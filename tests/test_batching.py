"""How micro-batches are formed: by length (group_by_length, batch_rebalance) or packed without padding.

The padded batch is the exact reference: a padding-free batch must give the same per-sequence log-probs, the same
weighted loss and gradients, and the same training run, to float noise.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from test_training import _args, _weighted_dir
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.lm.modeling import (
    completion_logprobs,
    flatten_prompt_completion,
    model_completion_logprobs,
    pad_prompt_completion,
)
from rlfree.lm.trainer import RLFreeTrainer, WeightedCollator
from rlfree.stages.train import ModelConfig, train

VOCAB_SIZE = len(toy.VOCAB)
# (prompt, completion) lengths: varied, one empty completion, one empty prompt (its first token is never scored).
LENGTHS = [(5, 9), (2, 1), (7, 13), (1, 4), (3, 0), (0, 6), (4, 2)]


def _model(attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _rows(lengths, seed=1) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt_index": i // 2,
            "prompt_ids": [rng.randrange(1, VOCAB_SIZE) for _ in range(prompt)],
            "completion_ids": [rng.randrange(VOCAB_SIZE) for _ in range(completion)],
            "weight": rng.uniform(0.1, 1.0),
        }
        for i, (prompt, completion) in enumerate(lengths)
    ]


def _both_batches(rows, max_length=None):
    prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
    return pad_prompt_completion(prompts, completions, 0, max_length), flatten_prompt_completion(
        prompts, completions, max_length
    )


def _grads(model, value, weights):
    model.zero_grad()
    (weights * value).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_flattened_batch_is_one_row_with_restarting_positions_and_no_padding():
    batch = flatten_prompt_completion([[7, 8], [9], [4, 5, 6]], [[1, 2, 3], [10, 11], [12, 13, 14, 15]], max_length=5)
    assert set(batch) == {"input_ids", "position_ids", "completion_mask"}  # no attention mask: it would hide packing
    assert batch["input_ids"].tolist() == [[7, 8, 1, 2, 3, 9, 10, 11, 4, 5, 6, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1]]


def test_transformers_masks_packed_rows_block_diagonally():
    """What padding-free batches rely on in transformers >= 4.54: no attention mask + restarting position ids."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    sequence = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = (sequence[:, None] == sequence[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    config = _model().config
    for attn_implementation in ("sdpa", "eager"):
        config._attn_implementation = attn_implementation
        mask = create_causal_mask(
            config=config, inputs_embeds=torch.zeros(1, 6, 16), attention_mask=None, cache=None,
            position_ids=position_ids,
        )  # fmt: skip
        allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # eager: additive mask
        assert torch.equal(allowed, expected), attn_implementation


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_packed_logprobs_and_gradients_equal_the_padded_ones(attn_implementation, chunk_size):
    model = _model(attn_implementation).train()
    padded, packed = _both_batches(_rows(LENGTHS))
    weights = torch.linspace(-1.0, 2.0, len(LENGTHS))
    (reference,) = model_completion_logprobs(
        model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"], chunk_size=chunk_size
    )
    reference_grads = _grads(model, reference, weights)
    (value,) = model_completion_logprobs(
        model, packed["input_ids"], None, packed["completion_mask"], chunk_size=chunk_size,
        position_ids=packed["position_ids"],
    )  # fmt: skip
    grads = _grads(model, value, weights)
    assert value.shape == (len(LENGTHS),)
    assert value[4].item() == 0.0  # the empty completion
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)


def test_full_logits_of_a_packed_row_sum_per_sequence_and_skip_each_first_token():
    """The logits before a sequence's first token belong to the previous sequence: that token is never scored."""
    logits = torch.randn(1, 7, VOCAB_SIZE)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    completion_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1]])  # the second sequence has no prompt
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    token_logprobs = torch.log_softmax(logits[0, :-1], -1).gather(-1, input_ids[0, 1:, None])[:, 0]
    expected = torch.stack([token_logprobs[0:2].sum(), token_logprobs[3], token_logprobs[5]])
    value = completion_logprobs(logits, input_ids, completion_mask, position_ids=position_ids)
    torch.testing.assert_close(value, expected)


def test_weighted_loss_and_gradients_of_a_padding_free_batch_equal_the_padded_ones(tmp_path):
    rows = _rows(LENGTHS)
    dataset = Dataset.from_list(rows)
    features = [{key: row[key] for key in ("prompt_ids", "completion_ids", "weight")} for row in rows]
    dataset_dir = _weighted_dir(tmp_path, rows)
    results = {}
    for padding_free in (False, True):
        model = _model().train()
        args = _args(tmp_path, dataset_dir, per_device_train_batch_size=7, padding_free=padding_free)
        trainer = RLFreeTrainer(model, args, dataset, toy.build_tokenizer())
        batch = trainer.data_collator(features)
        assert ("attention_mask" in batch) != padding_free
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[padding_free] = loss.detach(), {name: p.grad for name, p in model.named_parameters()}
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=0)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)


def _trained_parameters(tmp_path, rows, name, **overrides):
    args = _args(
        tmp_path / name, _weighted_dir(tmp_path, rows, name=name), optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_steps=3, per_device_train_batch_size=4, **overrides,
    )  # fmt: skip
    model = _model().train()
    RLFreeTrainer(model, args, Dataset.from_list(rows), toy.build_tokenizer()).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_padding_free_training_ends_with_the_padded_run_weights(tmp_path):
    rows = _rows([(1 + i % 6, 1 + (5 * i) % 11) for i in range(12)])
    padded = _trained_parameters(tmp_path, rows, "padded", logits_chunk_size=None)
    packed = _trained_parameters(tmp_path, rows, "packed", padding_free=True)
    untouched = torch.cat([p.flatten() for p in _model().parameters()])
    assert (padded - untouched).abs().max() > 1e-3  # the steps did move the weights
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


class _PositionBlindLlama(LlamaForCausalLM):
    """Takes position_ids but drops them: its attention cannot see the boundaries of a packed row."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


class _NoPositionsLlama(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize(
    ("model_class", "message"), [(_NoPositionsLlama, "takes no position_ids"), (_PositionBlindLlama, "see each other")]
)
def test_a_model_that_cannot_keep_packed_sequences_apart_is_refused(model_class, message):
    model = model_class(_model().config)
    _, packed = _both_batches(_rows(LENGTHS))
    with pytest.raises(StageInputError, match=message):
        model_completion_logprobs(
            model, packed["input_ids"], None, packed["completion_mask"], position_ids=packed["position_ids"]
        )


def _varied_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    return _rows([(rng.randrange(1, 5), rng.randrange(1, 40)) for _ in range(count)])


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_sampling_strategies_train_and_save_a_loadable_model(reference_dir, tmp_path, strategy):
    out = tmp_path / "model"
    rows = _varied_rows(16)
    args = _args(
        tmp_path, _weighted_dir(tmp_path, rows), output_dir=str(out), train_sampling_strategy=strategy, max_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-2,
    )  # fmt: skip
    trainer = train(ModelConfig(model_name_or_path=str(reference_dir)), args)
    assert trainer.state.global_step == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert not torch.equal(reloaded.lm_head.weight, reference.lm_head.weight)
    assert (out / "README.md").is_file()


def test_group_by_length_batches_rows_of_similar_length(tmp_path):
    rows = _varied_rows(64)

    def padding(strategy: str) -> int:
        args = _args(
            tmp_path, _weighted_dir(tmp_path, rows, name=strategy), train_sampling_strategy=strategy,
            per_device_train_batch_size=4,
        )  # fmt: skip
        trainer = RLFreeTrainer(_model(), args, Dataset.from_list(rows), toy.build_tokenizer())
        batches = list(trainer.get_train_dataloader())
        assert sum(len(batch["weight"]) for batch in batches) == len(rows)
        return sum(int((batch["attention_mask"] == 0).sum()) for batch in batches)

    assert padding("group_by_length") < 0.5 * padding("random")


def test_length_column_counts_the_tokens_the_collator_keeps(tmp_path):
    rows = _rows([(3, 10), (6, 1), (8, 4)])
    args = _args(tmp_path, _weighted_dir(tmp_path, rows), train_sampling_strategy="group_by_length", max_length=7)
    trainer = RLFreeTrainer(_model(), args, Dataset.from_list(rows), toy.build_tokenizer())
    assert trainer.train_dataset["length"] == [7, 7, 8]  # completions are cut to max_length, prompts never
    batch = WeightedCollator(0, 1.0, max_length=7)([trainer.train_dataset[i] for i in range(3)])
    assert batch["attention_mask"].sum(-1).tolist() == [7, 7, 8]
