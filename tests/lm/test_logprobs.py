"""Sequence log-probabilities: the chunked lm_head path gives the full-logits path's values and gradients, to float
noise, and packed rows are scored per sequence."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    LlamaConfig,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlfree import toy
from rlfree.lm.batching import pad_prompt_completion
from rlfree.lm.logprobs import completion_logprobs, model_completion_logprobs, verdicts
from rlfree.lm.trainer import RLFreeTrainer
from tests.helpers import ROWS, VOCAB_SIZE, training_args, write_weighted

SMALL = {"vocab_size": 97, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip


def _model(config_class=LlamaConfig, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config_class(**(SMALL | overrides))).eval()


def _batch(vocab_size=97, pad=0):
    generator = torch.Generator().manual_seed(1)
    lengths = [(5, 9), (2, 1), (7, 13), (1, 4)]  # (prompt, completion): varied, so rows are padded
    prompts = [torch.randint(1, vocab_size, (p,), generator=generator).tolist() for p, _ in lengths]
    completions = [torch.randint(1, vocab_size, (c,), generator=generator).tolist() for _, c in lengths]
    return pad_prompt_completion(prompts, completions, pad)


def _full(model, batch, processors=None):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_logprobs(logits, batch["input_ids"], batch["completion_mask"], processors)


def _chunked(model, batch, chunk_size, processor_sets=(None,)):
    return model_completion_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], processor_sets, chunk_size
    )


def _grads(model, weights, value):
    model.zero_grad()
    (weights * value).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(chunked, full):
    assert chunked.keys() == full.keys()
    for name, grad in full.items():  # float noise relative to the gradient's scale
        torch.testing.assert_close(chunked[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 10_000])
def test_values_and_gradients_match_full_logits(chunk_size, tie):
    model = _model(tie_word_embeddings=tie)
    batch = _batch()
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    full = _full(model, batch)
    full_grads = _grads(model, weights, full)
    (chunked,) = _chunked(model, batch, chunk_size)
    chunked_grads = _grads(model, weights, chunked)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert ("lm_head.weight" in chunked_grads) != tie
    _assert_same_grads(chunked_grads, full_grads)


def test_lm_head_sees_only_completion_positions_in_chunks():
    model = _model()
    batch = _batch()
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    (value,) = _chunked(model, batch, 4)
    value.sum().backward()
    handle.remove()
    completion_tokens = int(batch["completion_mask"][:, 1:].sum())
    chunks = [shape[0] for shape in rows if len(shape) == 2]
    assert max(chunks) <= 4
    assert sum(chunks) == 2 * completion_tokens  # forward, then the checkpointed recompute in backward
    assert all(shape[1] == 1 for shape in rows if len(shape) == 3)  # the model's own forward: last position only


def test_processors_and_several_sets_from_one_pass():
    model = _model()
    batch = _batch()
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)]
    with torch.no_grad():
        ref, proposal = _chunked(model, batch, 5, (None, warpers))
        torch.testing.assert_close(ref, _full(model, batch), rtol=1e-5, atol=1e-5)
        expected = _full(model, batch, warpers)
    assert torch.isinf(expected).any()  # some sampled-at-random tokens fall outside top-k/top-p: -inf, not NaN
    assert torch.equal(torch.isinf(proposal), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(proposal[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_rows_without_completion_and_none_means_full():
    model = _model()
    batch = pad_prompt_completion([[5, 6, 7], [8]], [[], [9, 10]], 0)
    with torch.no_grad():
        (chunked,) = _chunked(model, batch, 2)
        (full,) = _chunked(model, batch, None)
    assert chunked[0].item() == 0.0
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_gemma_softcapping_is_applied_in_the_chunked_path():
    model = _model(Gemma2Config, final_logit_softcapping=2.0)
    batch = _batch()
    full = _full(model, batch)
    full_grads = _grads(model, torch.ones(4), full)
    (chunked,) = _chunked(model, batch, 3)
    chunked_grads = _grads(model, torch.ones(4), chunked)
    assert "full_logits" not in verdicts(model) and "projection" in verdicts(model)
    # The verdicts are kept beside the model, not set on the Hugging Face object.
    assert not [name for name in vars(model) if "rlfree" in name]
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    _assert_same_grads(chunked_grads, full_grads)


def test_unknown_logit_scale_falls_back_to_full_logits():
    model = _model(CohereConfig, logit_scale=0.25)
    batch = _batch()
    with torch.no_grad():
        (chunked,) = _chunked(model, batch, 3)
        full = _full(model, batch)
    assert "full_logits" in verdicts(model)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_peft_lora_model_matches():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    batch = _batch()
    weights = torch.tensor([1.0, 0.5, -0.3, 2.0])
    full = _full(model, batch)
    full_grads = _grads(model, weights, full)
    (chunked,) = _chunked(model, batch, 4)
    chunked_grads = _grads(model, weights, chunked)
    assert full_grads and all("lora" in name for name in full_grads)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    _assert_same_grads(chunked_grads, full_grads)


def _train(tmp_path, name, chunk_size):
    rows = [dict(row, weight=row["weight"] * (1 + i % 3)) for i, row in enumerate(ROWS * 2)]
    args = training_args(
        tmp_path / name, write_weighted(tmp_path, rows, name=name), optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_steps=2, per_device_train_batch_size=5, logits_chunk_size=chunk_size,
    )  # fmt: skip
    tokenizer = toy.build_tokenizer()
    model = _model(vocab_size=len(tokenizer)).train()
    RLFreeTrainer(model, args, Dataset.from_list(rows), tokenizer).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_steps_are_the_same_with_and_without_chunks(tmp_path):
    full = _train(tmp_path, "full", None)
    chunked = _train(tmp_path, "chunked", 2)
    untouched = torch.cat([p.flatten() for p in _model(vocab_size=len(toy.build_tokenizer())).parameters()])
    assert (full - untouched).abs().max() > 1e-3
    torch.testing.assert_close(chunked, full, atol=2e-6, rtol=0)


def test_fsdp_sharded_models_use_full_logits(monkeypatch):
    """FSDP frees gathered weights after the forward, so the chunked lm_head must not run on an FSDP-sharded model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = _model()  # a random model: only which path runs, and its values, matter here
        fully_shard(model)
        batch = _batch()
        (sharded,) = _chunked(model, batch, chunk_size=3)
        assert "full_logits" in verdicts(model) and sharded.grad_fn.name() == "SumBackward1"  # the full-logits path
        torch.testing.assert_close(sharded, _full(model, batch))
    finally:
        dist.destroy_process_group()


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
