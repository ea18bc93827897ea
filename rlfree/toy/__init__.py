"""Offline toy task (single-digit addition) whose output space is small enough to enumerate exactly.

With a 14-token vocabulary and a few new tokens, every completion a sampler can produce can be listed, so the
reference distribution, the tilted target pi* ∝ pi_ref·exp(r/beta) and a trained policy's KL to it are exact
numbers rather than Monte Carlo estimates. Nothing here touches the network.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<eos>"
UNK = "<unk>"
VOCAB: list[str] = [EOS, UNK, *(str(d) for d in range(10)), "+", "="]

_PROMPT_RE = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=")
_BATCH_SIZE = 512
_TRAIN_LEN = 7  # "a + b =" (4 tokens) + up to two answer digits + EOS
NUM_PROMPTS = 100  # "a + b =" for single digits a and b


def _spaced(n: int) -> str:
    """Digits separated by spaces (12 -> "1 2") so that each digit is one word-level token."""
    return " ".join(str(n))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB, built locally because nothing can be downloaded.

    EOS doubles as the pad token and no BOS is added, so a prompt's ids are exactly its words.
    """
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=UNK)


def make_prompts(num_prompts: int | None = None, seed: int = 0) -> list[dict]:
    """All `NUM_PROMPTS` prompts "a + b =" (a, b in 0..9), or a seeded subset of that size in canonical order."""
    rows = [{"prompt": f"{a} + {b} =", "answer": _spaced(a + b)} for a in range(10) for b in range(10)]
    if num_prompts is None:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), num_prompts))
    return [rows[i] for i in keep]


def _true_sum(prompt: str) -> int:
    """Sum of the last "a + b =" in the prompt (the last one, so a few-shot prefix would not confuse it)."""
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    a, b = matches[-1]
    return int(a) + int(b)


def arithmetic_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is the prompt's sum as space-separated digits, else 0.0.

    The sum is recomputed from the prompt so the reward works without an `answer` column; extra kwargs (TRL
    passes every dataset column) are ignored.
    """
    return [
        float(completion.strip() == _spaced(_true_sum(prompt)))
        for prompt, completion in zip(prompts, completions, strict=True)
    ]


def _wrong_answer(correct: int, rng: random.Random) -> int:
    """A plausible mistake: off by one or ten, or a random sum 0..18; never the correct answer."""
    while True:
        wrong = correct + rng.choice((-10, -1, 1, 10)) if rng.random() < 0.5 else rng.randrange(19)
        if wrong >= 0 and wrong != correct:
            return wrong


def build_reference_model(
    seed: int = 0, train_steps: int = 300, correct_fraction: float = 0.5, num_attention_heads: int = 4
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama trained briefly on noisy sums, so pi_ref is meaningful but imperfect and spread out.

    Each training answer is correct with probability `correct_fraction` and a plausible wrong answer
    otherwise, so the model puts real mass on several answers; after the short training its exact accuracy
    is a little below `correct_fraction` (about 0.4-0.45 for 0.5), with the correct answer still the mode.
    `num_attention_heads=2` gives heads of 32 dimensions, the least vLLM's CPU attention runs.
    """
    tokenizer = build_tokenizer()
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=128,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id

    rng = random.Random(seed)
    prompts = [(tokenizer(row["prompt"])["input_ids"], _true_sum(row["prompt"])) for row in make_prompts()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(train_steps, 1))
    model.train()
    for _ in range(train_steps):
        input_ids, labels = [], []
        for _ in range(_BATCH_SIZE):
            prompt_ids, correct = rng.choice(prompts)
            answer = correct if rng.random() < correct_fraction else _wrong_answer(correct, rng)
            completion_ids = [VOCAB.index(digit) for digit in str(answer)] + [eos_id]
            padding = [eos_id] * (_TRAIN_LEN - len(prompt_ids) - len(completion_ids))
            input_ids.append(prompt_ids + completion_ids + padding)
            labels.append([-100] * len(prompt_ids) + completion_ids + [-100] * len(padding))
        loss = model(input_ids=torch.tensor(input_ids), labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), tokenizer


def write_task(
    root: Path, num_prompts: int, seed: int, num_attention_heads: int = 4
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, list[dict]]:
    """The toy task on disk as the stages read it: pi_ref in `root/reference`, prompts in `root/prompts.jsonl`."""
    model, tokenizer = build_reference_model(seed=seed, num_attention_heads=num_attention_heads)
    model.save_pretrained(root / "reference")
    tokenizer.save_pretrained(root / "reference")
    prompt_rows = make_prompts(num_prompts, seed=seed)
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompt_rows))
    return model, tokenizer, prompt_rows


def enumerate_completions(vocab_size: int, eos_token_id: int, max_new_tokens: int) -> list[list[int]]:
    """Every output of a sampler capped at `max_new_tokens`: EOS-terminated sequences plus truncated ones.

    The outcomes are disjoint and exhaustive, so their probabilities under any autoregressive model sum to 1.
    """
    others = [t for t in range(vocab_size) if t != eos_token_id]
    completions = [
        [*prefix, eos_token_id]
        for length in range(max_new_tokens)
        for prefix in itertools.product(others, repeat=length)
    ]
    completions += [list(seq) for seq in itertools.product(others, repeat=max_new_tokens)]
    return completions


@torch.no_grad()
def completion_logprobs(
    model, prompt_ids: list[int], completions: list[list[int]], batch_size: int = 1024, processors: list | None = None
) -> torch.Tensor:
    """Exact float64 log pi(o | q) per completion, teacher forced through the full softmax at temperature 1.

    `processors` (transformers logits warpers, e.g. temperature then top-p) are applied to each step's float64 logits
    first: the result is then the exact log-probability under that sampler, -inf outside its support.

    Completions that differ only in their last token share one forward pass over prompt + the rest, so an
    enumeration costs one pass per distinct prefix (about vocab_size times fewer). `batch_size` counts those
    prefixes. Right padding needs no attention mask in a causal model: pads come after every position read.
    The model is put in eval mode for the call (dropout would make the numbers inexact) and then restored.
    Written independently of `rlfree.modeling.completion_logprobs` on purpose: tests check the pipeline's
    numbers against this one.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must be non-empty: the first completion token is predicted from it")
    prefix_index: dict[tuple[int, ...], int] = {}
    for completion in completions:
        prefix_index.setdefault(tuple(completion[:-1]), len(prefix_index))
    prefixes = list(prefix_index)
    width = max((len(c) for c in completions), default=0)
    rows = torch.tensor([prefix_index[tuple(c[:-1])] for c in completions], dtype=torch.long)
    targets = torch.tensor([c + [0] * (width - len(c)) for c in completions], dtype=torch.long)
    mask = torch.arange(width) < torch.tensor([len(c) for c in completions]).unsqueeze(1)
    positions = torch.arange(width)
    device = next(model.parameters()).device
    result = torch.zeros(len(completions), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prefixes), batch_size):
            chunk = prefixes[start : start + batch_size]
            input_ids = torch.tensor([prompt_ids + [*p] + [0] * (width - 1 - len(p)) for p in chunk])
            logits = model(input_ids=input_ids.to(device)).logits[:, len(prompt_ids) - 1 :]
            scores = logits.double().flatten(0, 1)
            for processor in processors or []:
                scores = processor(input_ids, scores)
            logprobs = scores.view(logits.shape).log_softmax(-1).cpu()  # [prefix, step, vocab]: log p(. | q, o_<step)
            selected = (rows >= start) & (rows < start + len(chunk))
            token_logprobs = logprobs[rows[selected, None] - start, positions, targets[selected]]
            result[selected] = token_logprobs.masked_fill(~mask[selected], 0.0).sum(-1)
        return result
    finally:
        model.train(was_training)


def exact_distributions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """Exact log-probabilities and rewards of every possible completion for each prompt.

    Prompts are tokenized exactly as a generator would and completions decoded with special tokens skipped,
    so the rewards match what a sampled completion would have received.
    """
    completions = enumerate_completions(model.config.vocab_size, tokenizer.eos_token_id, max_new_tokens)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    logprobs = torch.stack(
        [completion_logprobs(model, tokenizer(prompt)["input_ids"], completions) for prompt in prompts]
    )
    rewards = torch.tensor(
        [arithmetic_reward([prompt] * len(texts), texts) for prompt in prompts], dtype=torch.float64
    )
    return {"completions": completions, "logprobs": logprobs, "rewards": rewards}


def tilt(
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor | None = None,
    beta: float | None = None,
    rlif_exponent: float | None = None,
) -> torch.Tensor:
    """Exact log pi* per row: log_softmax(ref + r/beta [+ rlif_exponent·ref]) over the enumerated outcomes."""
    if (rewards is None) != (beta is None):
        raise ValueError("rewards and beta must be given together")
    logits = ref_logprobs
    if rewards is not None:
        logits = logits + rewards.to(ref_logprobs.dtype) / beta
    if rlif_exponent is not None:
        logits = logits + rlif_exponent * ref_logprobs
    return logits.log_softmax(-1)


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the same enumerated outcomes, with 0·log 0 = 0 where p has no mass."""
    terms = p_logprobs.exp() * (p_logprobs - q_logprobs)
    return torch.where(torch.isneginf(p_logprobs), torch.zeros_like(terms), terms).sum(-1)


def accuracy_and_reward(logprobs: torch.Tensor, rewards: torch.Tensor) -> tuple[float, float]:
    """(mean expected reward, mean probability of reward-1 completions), both exact and averaged over rows."""
    probs = logprobs.exp()
    mean_reward = (probs * rewards.to(probs.dtype)).sum(-1).mean().item()
    accuracy = (probs * (rewards == 1).to(probs.dtype)).sum(-1).mean().item()
    return mean_reward, accuracy
