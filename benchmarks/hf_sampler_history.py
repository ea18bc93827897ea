"""The HF sampler before and after its noise changed (issue 10): per-row Gumbel-max, one `torch.rand` kernel per row
per step (commit 3e532fd), against batched inverse-CDF with counter-based noise (now). Each against plain
`model.generate(do_sample=True)` on the same model, in the same process, alternating, so that the ratio survives the
machine's drift. The draw only: the old code's teacher-forced pass is stubbed out, as the new backend times it.

    git worktree add /tmp/rlfree-3e532fd 3e532fd
    python benchmarks/hf_sampler_history.py --before /tmp/rlfree-3e532fd     # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PROMPTS, SAMPLES, NEW_TOKENS, BATCH_SIZE, PAIRS = 16, 8, 64, 64, 5


def build() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[int, list[int]]]:
    """benchmarks/generation.py's CPU model (EOS as rare as any token), its tokenizer and prompts."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1")), eos_token="t0", pad_token="t0"
    )
    prompt_ids = {
        p: torch.randint(1, 1000, (16,), generator=torch.Generator().manual_seed(p)).tolist() for p in range(PROMPTS)
    }
    return LlamaForCausalLM(config).eval(), tokenizer, prompt_ids


def rlfree_draw(version: str, model, tokenizer, prompt_ids):
    """A function drawing the samples with the rlfree on sys.path and returning the tokens it generated."""
    if version == "before":
        import rlfree.generation as generation  # the layout before lm/ existed

        generation.model_completion_logprobs = lambda *args, **kwargs: (torch.zeros(PROMPTS * SAMPLES),)
        return lambda: sum(
            row["num_tokens"]
            for row in generation.sample_completions(
                model, tokenizer, prompt_ids, SAMPLES, NEW_TOKENS, batch_size=BATCH_SIZE
            )
        )
    from rlfree.lm.backends import BackendModel, load_backend
    from rlfree.options import SamplerOptions

    sampler = SamplerOptions(max_new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, seed=0)
    backend = load_backend(BackendModel("random", "auto", False, lambda: model), sampler, [0])
    return lambda: sum(len(draw.completion_ids) for draw in backend.draw(prompt_ids, SAMPLES, seed=0))


@torch.no_grad()
def plain_generate(model, prompt_ids) -> int:
    rows = [ids for ids in prompt_ids.values() for _ in range(SAMPLES)]
    tokens = 0
    for start in range(0, len(rows), BATCH_SIZE):
        input_ids = torch.tensor(rows[start : start + BATCH_SIZE])
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
            max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=0,
        )  # fmt: skip
        new = output[:, input_ids.shape[1] :]
        tokens += int((new.eq(0).cumsum(-1) - new.eq(0).long() == 0).sum())  # up to and including the first EOS
    return tokens


def tokens_per_second(run) -> float:
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)


def measure(version: str) -> None:
    model, tokenizer, prompt_ids = build()
    draw = rlfree_draw(version, model, tokenizer, prompt_ids)
    draw(), plain_generate(model, prompt_ids)  # warm-up
    ratios = [tokens_per_second(draw) / tokens_per_second(lambda: plain_generate(model, prompt_ids)) for _ in range(PAIRS)]  # fmt: skip
    print(
        f"{version:6} rlfree / plain generate tokens/s: median {statistics.median(ratios):.2f} "
        f"(pairs {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="A checkout of commit 3e532fd (git worktree add DIR 3e532fd).")
    parser.add_argument("--version", choices=["before", "after"], help=argparse.SUPPRESS)  # one child per version
    args = parser.parse_args()
    if args.version:
        measure(args.version)
        return
    here = Path(__file__).resolve().parents[1]
    for version, checkout in (("before", Path(args.before).resolve()), ("after", here)):
        env = os.environ | {"PYTHONPATH": str(checkout)}
        command = [sys.executable, __file__, "--before", args.before, "--version", version]
        subprocess.run(command, env=env, check=True, cwd=checkout, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
