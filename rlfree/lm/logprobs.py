"""Sequence log-probabilities of completions: the one computation behind `ref_logprob` and the training loss.

Generation (for `ref_logprob`) and training (for the loss) both read log pi(o|q) here, so the number the weights were
computed from and the number the trainer maximizes are the same computation. What a model's architecture allows (a
chunked lm_head, packed rows) is decided once per model and remembered here, beside the model, not on it.
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..errors import StageInputError
from ..training import DEFAULT_LOGITS_CHUNK_SIZE

logger = logging.getLogger(__name__)

# Per model (the unwrapped transformers module), verdicts that hold for its architecture: "projection" (our chunked
# lm_head reproduces its logits), "full_logits" (it must use the full-logits path), "packing" (packed rows stay apart).
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def verdicts(model: torch.nn.Module) -> set[str]:
    """What has been established about `model`'s architecture so far (see `_VERDICTS`)."""
    return _VERDICTS.setdefault(unwrap(model), set())


def _scored_tokens(
    completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Which targets `input_ids[:, 1:]` are scored, the sequence each scored one belongs to, and how many sequences.

    Without `position_ids` each row is one sequence. With them, a row may pack several: a sequence starts wherever the
    position does not step by exactly 1 (transformers' own rule for packed rows), sequences are numbered in order
    across rows, and a sequence's first token is never scored, since the logits before it belong to the previous
    sequence (a padded row never scores its first token either).
    """
    selected = completion_mask[:, 1:].bool()
    if position_ids is None:
        return selected, selected.nonzero()[:, 0], completion_mask.size(0)
    position_ids = position_ids.expand_as(completion_mask)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    sequence = starts.flatten().cumsum(0).view_as(starts) - 1
    selected = selected & ~starts[:, 1:]
    return selected, sequence[:, 1:][selected], int(starts.sum())


def completion_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    processors=None,
    position_ids: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Sequence log-probability of each completion: the *sum* over its tokens, in `score_dtype()`.

    `logits` are the model's outputs for `input_ids`; the token at position t is scored by the logits at t-1.
    `processors` (transformers logits warpers: temperature, top-k, top-p) turn the model's distribution into a
    sampler's; without them this is the model's full softmax at temperature 1. One value per row, or, with the
    `position_ids` of packed rows (`flatten_prompt_completion`), one per packed sequence. With `per_token`, the
    scored tokens' own log-probabilities instead, flat, row by row.
    """
    logits = logits[:, :-1].to(score_dtype())
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    if processors:
        flat = logits.reshape(-1, logits.size(-1))
        for processor in processors:
            flat = processor(None, flat)
        logits = flat.view_as(logits)
    token_logprobs = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    if position_ids is not None:
        selected, sequence, num_sequences = _scored_tokens(completion_mask, position_ids)
        if per_token:
            return token_logprobs[selected]
        return token_logprobs.new_zeros(num_sequences).index_add(0, sequence, token_logprobs[selected])
    if per_token:
        return token_logprobs[mask.bool()]
    # A token the sampler could not have drawn has log p = -inf; keep it (the weighting stage rejects it) but never
    # let -inf * 0 on padding turn into NaN.
    token_logprobs = torch.where(mask.bool(), token_logprobs, torch.zeros_like(token_logprobs))
    return token_logprobs.sum(-1)


def model_completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    processor_sets: tuple = (None,),
    chunk_size: int | None = DEFAULT_LOGITS_CHUNK_SIZE,
    position_ids: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`completion_logprobs` for each entry of `processor_sets`, from one forward pass of `model`, in bounded memory.

    Returns one [B] tensor (in `score_dtype()`) per entry of `processor_sets` (None or [] = the model's own softmax;
    a list of logits warpers = that sampler's distribution), the same numbers as
    `completion_logprobs(model(...).logits, ...)` to float noise. With `chunk_size` set, the model's forward keeps the
    logits of one position only; the final hidden states of the *completion* positions are projected through the
    output embeddings `chunk_size` positions at a time, each chunk upcast to `score_dtype()` for the log-softmax and
    dropped; under autograd each chunk is checkpointed, so backward recomputes its logits instead of holding them.
    Prompt and padding positions never reach the lm_head.
    `chunk_size` None or 0, a model whose forward takes no `logits_to_keep`, or one whose logits our projection does not
    reproduce (a post-lm_head transform other than Gemma's `final_logit_softcapping`) use the full-logits path.

    Packed rows (`flatten_prompt_completion`) come with `position_ids` and no `attention_mask`, and give one value per
    packed sequence; on a model's first packed call, `check_packing` makes sure the model keeps the sequences apart.

    `model` may be wrapped (PEFT, DDP, DeepSpeed): the forward goes through the wrapper, and the decoder and output
    embeddings are found on the unwrapped model.
    """
    base = unwrap(model)
    if position_ids is None:
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    else:
        if attention_mask is not None:
            raise ValueError("packed rows take position_ids and no attention_mask, which would hide their boundaries")
        check_packing(model, input_ids.device)
        model_inputs = {"input_ids": input_ids, "position_ids": position_ids} | _without_cache(base)
    if not chunk_size or _needs_full_logits(model, base) or not _takes(base, "logits_to_keep"):
        logits = model(**model_inputs).logits
        return tuple(
            completion_logprobs(logits, input_ids, completion_mask, p, position_ids, per_token) for p in processor_sets
        )
    if chunk_size < 0:
        raise ValueError(f"logits_chunk_size must be a positive number of positions, or 0/None, got {chunk_size}")

    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0]
        device_type = output[0].device.type
        captured["autocast"] = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    handle = base.get_decoder().register_forward_hook(keep_hidden)
    try:
        outputs = model(**model_inputs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    device_type, autocast_enabled, autocast_dtype = captured["autocast"]
    lm_head = base.get_output_embeddings()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)

    def project(states: torch.Tensor) -> torch.Tensor:
        # The lm_head under the autocast state the model's own forward ran in, then the model's soft-capping.
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            logits = lm_head(states)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    with torch.no_grad():
        # Guard, on a model's first call: our projection of the last position must be the model's own logits there,
        # else fall back for good. A logit transform is part of the architecture, so one verdict per model holds.
        reproduces = "projection" in verdicts(base) or torch.allclose(
            project(hidden[:, -1:]).float(), outputs.logits[:, -1:].float(), rtol=1e-3, atol=1e-3
        )
        if hidden.shape[:2] != input_ids.shape or not reproduces:
            verdicts(base).add("full_logits")
            logger.warning(
                "%s: projecting hidden states through the output embeddings does not reproduce the model's logits "
                "(a logit scale or cap?); using full logits",
                type(base).__name__,
            )
            return model_completion_logprobs(
                model, input_ids, attention_mask, completion_mask, processor_sets, None, position_ids, per_token
            )
    verdicts(base).add("projection")
    del outputs

    # Position t-1 scores token t; only completion tokens are scored.
    selected, sequence, num_sequences = _scored_tokens(completion_mask, position_ids)
    states = hidden[:, :-1][selected]  # [N, H]
    targets = input_ids[:, 1:][selected]  # [N]
    results = []
    for processors in processor_sets:
        token_logprobs = []
        for start in range(0, states.size(0), chunk_size):
            chunk = (states[start : start + chunk_size], targets[start : start + chunk_size])
            if torch.is_grad_enabled() and (chunk[0].requires_grad or lm_head.weight.requires_grad):
                token_logprobs.append(
                    torch.utils.checkpoint.checkpoint(
                        _chunk_logprobs, project, processors, *chunk, use_reentrant=False
                    )
                )
            else:
                token_logprobs.append(_chunk_logprobs(project, processors, *chunk))
        values = torch.cat(token_logprobs) if token_logprobs else states.new_zeros(0, dtype=score_dtype())
        if per_token:
            results.append(values)
            continue
        sums = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
        results.append(sums.index_add(0, sequence, values))
    return tuple(results)


def score_dtype() -> torch.dtype:
    """The log-softmax's dtype: float32 under autograd (the training loss), float64 when only reading values.

    Over a vocabulary of ~50k, float32's log-softmax is off by about 2e-5 nats per token, in one direction (measured on
    SmolLM2-135M: 4e-4 nats over a 22-token completion); float64 removes that, so `ref_logprob` matches the sampling
    pass's own float64 softmax to rounding of the logits, and costs only the chunk's upcast.
    """
    return torch.float32 if torch.is_grad_enabled() else torch.float64


def _chunk_logprobs(project, processors, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = project(states).to(score_dtype())
    for processor in processors or ():
        logits = processor(None, logits)
    return -F.cross_entropy(logits, targets, reduction="none")


def _needs_full_logits(model, base) -> bool:
    """Whether the chunked lm_head cannot serve this model: decided once per model, with a warning.

    It runs after the model's forward, on the output embeddings; FSDP frees a unit's gathered parameters once that
    unit's forward ends, so under FSDP the projection would read freed weights (seen on an H100 with
    launch/fsdp2.yaml: an illegal memory access in the second step). FSDP therefore uses the full-logits path.
    """
    if "full_logits" in verdicts(base):
        return True
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, (FSDPModule, FullyShardedDataParallel)) or isinstance(base, FSDPModule):
        verdicts(base).add("full_logits")
        logger.warning("%s is sharded by FSDP: using full logits (no chunked lm_head)", type(base).__name__)
        return True
    return False


def unwrap(model):
    """The transformers model inside DDP/DeepSpeed (`.module`) and PEFT (`get_base_model`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)  # DDP/DeepSpeed, torch.compile
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _takes(model, parameter: str) -> bool:
    return parameter in inspect.signature(model.forward).parameters


def _without_cache(model) -> dict[str, bool]:
    """`use_cache=False` where the forward takes it: with a cache, transformers does not look for packed rows."""
    return {"use_cache": False} if _takes(model, "use_cache") else {}


def check_packing(model, device: torch.device) -> None:
    """Refuse a model that would let the sequences of a packed row see each other; one verdict per model.

    The restarting `position_ids` must reach the model, and its layers must keep sequences apart: transformers' mask
    functions and flash-attention's varlen path do, but not every attention implementation or custom model, and a
    recurrent (state-space, linear-attention) layer carries its state across the boundary. So: a short sequence
    packed behind another must give the logits it gives alone. The scale of a leak is measured on the same sequences
    joined without restarting positions, so the verdict holds in any dtype. Fixed token ids give every rank the
    same verdict.
    """
    base = unwrap(model)
    if "packing" in verdicts(base):
        return
    name = type(base).__name__
    if not _takes(base, "position_ids"):
        raise StageInputError(
            f"{name}.forward takes no position_ids, so it cannot tell the sequences of a padding-free batch apart; "
            "train with padded batches (drop --padding_free)"
        )
    length = 8
    vocab_size = base.config.get_text_config().vocab_size
    first = (torch.arange(length, device=device) * 7 + 3) % vocab_size
    second = (torch.arange(length, device=device) * 13 + 5) % vocab_size
    positions = torch.arange(length, device=device)
    no_cache = _without_cache(base)

    def logits(ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids[None], position_ids=position_ids[None], **no_cache).logits[0, -length:].float()

    was_training = model.training
    model.eval()  # no dropout, so the passes are comparable
    try:
        with torch.no_grad():
            alone = logits(second, positions)
            packed = logits(torch.cat([first, second]), torch.cat([positions, positions]))
            joined = logits(torch.cat([first, second]), torch.arange(2 * length, device=device))
    finally:
        model.train(was_training)
    error, leak = (packed - alone).abs().max(), (joined - alone).abs().max()
    if error > 0.1 * leak:
        raise StageInputError(
            f"{name} (attn_implementation={base.config._attn_implementation!r}) lets the sequences of a packed row see "
            f"each other (packed vs alone logits differ by {error:.3g}, joined by {leak:.3g}); use sdpa, "
            "eager or flash_attention_2, or train with padded batches (drop --padding_free)"
        )
    verdicts(base).add("packing")
