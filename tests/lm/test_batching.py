"""Padding and packing: a padding-free batch gives the padded batch's per-sequence log-probs, weighted loss, gradients
and training run, to float noise."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.lm.batching import flatten_prompt_completion, pad_prompt_completion
from rlfree.lm.logprobs import model_completion_logprobs
from rlfree.lm.trainer import RLFreeTrainer
from tests.helpers import random_rows, tiny_llama, training_args, write_weighted

# (prompt, completion) lengths: varied, one empty completion, one empty prompt (its first token is never scored).
LENGTHS = [(5, 9), (2, 1), (7, 13), (1, 4), (3, 0), (0, 6), (4, 2)]


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
    config = tiny_llama().config
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
    model = tiny_llama(attn_implementation).train()
    padded, packed = _both_batches(random_rows(LENGTHS))
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


def test_weighted_loss_and_gradients_of_a_padding_free_batch_equal_the_padded_ones(tmp_path):
    rows = random_rows(LENGTHS)
    dataset = Dataset.from_list(rows)
    features = [{key: row[key] for key in ("prompt_ids", "completion_ids", "weight")} for row in rows]
    dataset_dir = write_weighted(tmp_path, rows)
    results = {}
    for padding_free in (False, True):
        model = tiny_llama().train()
        args = training_args(tmp_path, dataset_dir, per_device_train_batch_size=7, padding_free=padding_free)
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
    args = training_args(
        tmp_path / name, write_weighted(tmp_path, rows, name=name), optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_steps=3, per_device_train_batch_size=4, **overrides,
    )  # fmt: skip
    model = tiny_llama().train()
    RLFreeTrainer(model, args, Dataset.from_list(rows), toy.build_tokenizer()).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_padding_free_training_ends_with_the_padded_run_weights(tmp_path):
    rows = random_rows([(1 + i % 6, 1 + (5 * i) % 11) for i in range(12)])
    padded = _trained_parameters(tmp_path, rows, "padded", logits_chunk_size=None)
    packed = _trained_parameters(tmp_path, rows, "packed", padding_free=True)
    untouched = torch.cat([p.flatten() for p in tiny_llama().parameters()])
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
    model = model_class(tiny_llama().config)
    _, packed = _both_batches(random_rows(LENGTHS))
    with pytest.raises(StageInputError, match=message):
        model_completion_logprobs(
            model, packed["input_ids"], None, packed["completion_mask"], position_ids=packed["position_ids"]
        )
