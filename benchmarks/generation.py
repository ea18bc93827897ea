"""The generate stage's sampling backends side by side: HF `generate` against vLLM, on the same model and prompts.

For each backend, in one run: new tokens per second of the draw (against plain `model.generate(do_sample=True)` on the
same model, prompts and batch size, the peer), the teacher-forced pass that reads `ref_logprob` (the trainer's own
computation) and its share of the stage when it runs, the stage's new tokens/s as it runs by default (the HF backend
sampling pi_ref's own fp32 softmax takes `ref_logprob` from its sampling pass and skips that pass), and peak memory.
Run it alone (two cores are easily oversubscribed), in the environment that has vLLM:

    .venv-vllm/bin/python benchmarks/generation.py                 # CPU: a small random Llama
    python benchmarks/generation.py --preset smollm2 --backends generate hf   # CPU: the packaged SmolLM2-135M
    python benchmarks/generation.py --preset qwen0.5b --dtype bfloat16   # GPU: Qwen2.5-0.5B's shapes, N=16, 512 tokens

The random models are built here (nothing is downloaded) and saved once so that both backends load the same folder;
`smollm2` is the real SmolLM2-135M-Instruct that `make install` ships, on the demo's chat prompts
(recipes/addition_train.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlfree.data import load_prompts
from rlfree.lm.backends import BackendModel, load_backend
from rlfree.lm.generation import teacher_forced
from rlfree.lm.loading import eos_token_ids, load_causal_lm, load_tokenizer
from rlfree.options import SamplerOptions
from rlfree.sources import model_folder, packaged_model

BATCH_SIZE = 64
PRESETS = {
    # hidden 256, 4 layers, heads of 64, 8k vocabulary: big enough that the model, not Python, is the cost on a CPU.
    "cpu": {"prompts": 16, "samples": 8, "prompt_tokens": 16, "new_tokens": 64},
    "qwen0.5b": {"prompts": 32, "samples": 16, "prompt_tokens": 64, "new_tokens": 512},
    # The real model on real chat prompts (about 47 tokens with the template's system prompt).
    "smollm2": {"prompts": 16, "samples": 4, "prompt_tokens": None, "new_tokens": 32},
}
EOS = 0  # the random models' EOS and pad id
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "recipes" / "addition_train.jsonl"


def save_model(folder: Path, preset: str) -> None:
    """A random model whose EOS (id 0) is as rare as any token (about 1/vocab per step), so nearly every sample runs
    its full length and both backends generate about the same number of tokens."""
    torch.manual_seed(0)
    if preset == "qwen0.5b":
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            eos_token_id=0, pad_token_id=0, bos_token_id=None,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
    else:
        config = LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=0, pad_token_id=0, bos_token_id=None,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1")), eos_token="t0", pad_token="t0"
    )
    tokenizer.save_pretrained(folder)


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median wall time of `repeats` calls (the CPU's speed drifts between calls), and the last call's result."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def make_prompts(preset: dict, folder: str) -> dict[int, list[int]]:
    """Random token ids, or (smollm2) the demo's chat prompts through the model's template."""
    if preset["prompt_tokens"] is None:
        tokenizer = load_tokenizer(folder)
        rows = load_prompts(str(PROMPTS_FILE))["messages"][: preset["prompts"]]
        return {
            p: tokenizer.apply_chat_template(m, add_generation_prompt=True)["input_ids"] for p, m in enumerate(rows)
        }
    return {
        p: torch.randint(1, 1000, (preset["prompt_tokens"],), generator=torch.Generator().manual_seed(p)).tolist()
        for p in range(preset["prompts"])
    }


def left_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), EOS, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def run_plain_generate(preset: dict, folder: str, model, eos: int, repeats: int) -> dict:
    """The peer: `model.generate(do_sample=True)` on the same prompts and batch size, no seeds per sample, no
    log-probabilities (what a script without rlfree's guarantees would run)."""
    rows = [ids for ids in make_prompts(preset, folder).values() for _ in range(preset["samples"])]
    generate = functools.partial(
        model.generate,
        do_sample=True,
        top_k=0,
        max_new_tokens=preset["new_tokens"],
        pad_token_id=eos,
        eos_token_id=eos,
    )
    generate(input_ids=torch.tensor(rows[:1], device=model.device))  # warm-up

    def draw() -> int:
        tokens = 0
        for start in range(0, len(rows), BATCH_SIZE):
            input_ids, attention_mask = left_padded(rows[start : start + BATCH_SIZE], model.device)
            new = generate(input_ids=input_ids, attention_mask=attention_mask)[:, input_ids.shape[1] :]
            # Tokens up to and including the first EOS: what a sample holds.
            tokens += int((new.eq(eos).cumsum(-1) - new.eq(eos).long() == 0).sum())
        return tokens

    drawn, tokens = median_seconds(draw, repeats)
    return {"backend": "generate", "start_s": 0.0, "tokens": tokens, "tokens_per_s": tokens / drawn, "draw_s": drawn,
            "teacher_forced_s": math.nan, "teacher_forced_share": math.nan, "stage_tokens_per_s": math.nan,
            "peak_mib": peak_memory_mib()}  # fmt: skip


def run_backend(name: str, folder: str, dtype: str, preset: dict, model, eos: int, repeats: int) -> dict:
    if name == "generate":
        return run_plain_generate(preset, folder, model, eos, repeats)
    sampler = SamplerOptions(max_new_tokens=preset["new_tokens"], backend=name, batch_size=BATCH_SIZE, seed=0)
    prompt_ids = make_prompts(preset, folder)
    started = time.perf_counter()
    backend = load_backend(BackendModel(folder, dtype, False, lambda: model), sampler, [eos])
    start_up = time.perf_counter() - started
    try:
        backend.draw({0: prompt_ids[0]}, 1, seed=1)  # warm-up: first-call compilation and allocation
        drawn, draws = median_seconds(lambda: backend.draw(prompt_ids, preset["samples"], seed=0), repeats)
    finally:
        backend.close()  # before the teacher-forced pass: an idle engine still polls, and would slow it on a CPU
    # What the stage runs after the draw by default (nothing to teacher-force where the sampling pass gave
    # log pi_ref), and the full teacher-forced pass (--teacher_forced_logprobs, vLLM, another dtype or proposal).
    after_draw, _ = median_seconds(lambda: teacher_forced(draws, prompt_ids, model, None, sampler, eos), repeats)
    bare = [dataclasses.replace(draw, model_token_logprobs=None) for draw in draws]
    forced, _ = median_seconds(lambda: teacher_forced(bare, prompt_ids, model, None, sampler, eos), repeats)
    tokens = sum(len(draw.completion_ids) for draw in draws)
    return {
        "backend": name,
        "start_s": start_up,
        "tokens": tokens,
        "tokens_per_s": tokens / drawn,
        "draw_s": drawn,
        "teacher_forced_s": forced,
        "teacher_forced_share": forced / (drawn + forced),
        "stage_tokens_per_s": tokens / (drawn + after_draw),
        "peak_mib": peak_memory_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--backends", nargs="+", default=["generate", "hf", "vllm"], help="generate = plain model.generate, the peer"
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each step; the median is reported.")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(str(packaged_model())) if args.preset == "smollm2" else scratch
        if args.preset != "smollm2":
            save_model(Path(folder), args.preset)
        model = load_causal_lm(folder, args.dtype)
        eos = eos_token_ids(model, load_tokenizer(folder))[0] if args.preset == "smollm2" else EOS
        print(
            f"{preset['prompts']} prompts x {preset['samples']} samples x {preset['new_tokens']} new tokens, "
            f"device {model.device}, dtype {model.dtype}; peak memory: "
            + ("torch.cuda.max_memory_allocated (HF side)" if torch.cuda.is_available() else "process max RSS so far")
        )
        results = [run_backend(name, folder, args.dtype, preset, model, eos, args.repeats) for name in args.backends]
    header = f"{'backend':8} {'start s':>8} {'new tok/s':>10} {'draw s':>8} {'teacher-forced s':>17} {'share':>6}"
    print(header + f" {'stage tok/s':>12} {'peak MiB':>9}")
    for r in results:
        print(
            f"{r['backend']:8} {r['start_s']:8.1f} {r['tokens_per_s']:10.0f} {r['draw_s']:8.2f} "
            f"{r['teacher_forced_s']:17.2f} {r['teacher_forced_share']:6.1%} {r['stage_tokens_per_s']:12.0f} "
            f"{r['peak_mib']:9.0f}"
        )
    peer = results[0]
    for r in results[1:]:
        print(
            f"{r['backend']} / {peer['backend']} new tokens/s: draw {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x, "
            f"stage {r['stage_tokens_per_s'] / peer['tokens_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
