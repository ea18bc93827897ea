"""Throughput and peak memory of training micro-batches: padded (random order), group_by_length, padding_free.

The same weighted dataset (prompts of 16-64 tokens, completions spread over 32-512 tokens, as sampled completions
are) goes through `RLFreeTrainer`'s own sampler, collator and loss for one epoch, so every variant scores exactly the
same completion tokens:

    padded           --train_sampling_strategy random: each micro-batch right-padded to its longest row
    group_by_length  --train_sampling_strategy group_by_length: rows of similar length share a micro-batch
    padding_free     --padding_free: each micro-batch packed into one row, position ids restarting per sequence

A step is the trainer's forward + backward (chunked lm_head, the default). The optimizer step is left out: it costs
the same in every variant, and without it the weights stay fixed, so the summed loss of the epoch must agree across
variants, a check that all three compute the same objective. Each variant runs in a fresh child process. On CUDA
the memory figure is `torch.cuda.max_memory_allocated` during the epoch (minus what was allocated before); on CPU it
is the child's peak resident set (`getrusage` ru_maxrss) minus its resident set just before, as in memory.py.
Ratios are against the padded run of the same invocation.

    python benchmarks/padding.py                  # about 1.5 minutes on 2 idle CPU cores (4 when shared)
    python benchmarks/padding.py --num_sequences 128 --num_layers 4 --attn_implementation eager

group_by_length sorts rows by length within mega-batches of min(sequences // (4 * batch), 50) micro-batches
(transformers' LengthGroupedSampler): with few sequences it has little to group, so its gain grows with the data.

On CPU, sdpa and eager attention of a packed row compute the whole (sum of lengths)^2 score matrix under a
block-diagonal mask, so padding-free saves the padding in the linear layers but not in attention; on GPU,
flash_attention_2 runs packed rows with varlen kernels and saves both.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import measure
import torch
from datasets import Dataset

from rlfree import toy
from rlfree.lm.trainer import RLFreeTrainer
from rlfree.training import RLFreeConfig

VARIANTS = {
    "padded": {"train_sampling_strategy": "random"},
    "group_by_length": {"train_sampling_strategy": "group_by_length"},
    "padding_free": {"padding_free": True},
}


def _rows(args: argparse.Namespace) -> list[dict]:
    """Weighted rows of random token ids: N completions per prompt, lengths spread like sampled completions."""
    rng = random.Random(args.seed)
    rows = []
    for prompt_index in range(args.num_sequences // args.samples_per_prompt):
        prompt = [rng.randrange(args.vocab_size) for _ in range(rng.randint(16, 64))]
        for _ in range(args.samples_per_prompt):
            length = rng.randint(args.min_completion_length, args.max_completion_length)
            completion = [rng.randrange(args.vocab_size) for _ in range(length)]
            rows.append(
                {"prompt_index": prompt_index, "prompt_ids": prompt, "completion_ids": completion,
                 "weight": rng.random()}
            )  # fmt: skip
    return rows


def _run(variant: str, args: argparse.Namespace, queue) -> None:
    device = measure.device()
    model = measure.random_llama(
        args.vocab_size, args.hidden_size, args.num_layers, attn_implementation=args.attn_implementation
    )
    dataset = Dataset.from_list(_rows(args))
    with tempfile.TemporaryDirectory() as work:
        dataset.save_to_disk(f"{work}/weighted")
        training_args = RLFreeConfig(
            output_dir=f"{work}/out", dataset_dir=f"{work}/weighted", per_device_train_batch_size=args.batch_size,
            report_to="none", seed=args.seed, **VARIANTS[variant],
        )  # fmt: skip
        # The collator needs only a pad id from the tokenizer; the toy tokenizer's is 0.
        trainer = RLFreeTrainer(model, training_args, dataset, toy.build_tokenizer())
        batches = list(trainer.get_train_dataloader())

    def step(batch: dict) -> float:
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    # Warm-up on the two shortest rows: first-call costs (allocator, checks of the model) stay out of the figures.
    shortest = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["completion_ids"]))[:2]
    step(trainer.data_collator([dataset[i] for i in shortest]))
    loss_sum, seconds, peak_mib = measure.measured(lambda: sum(step(batch) for batch in batches))
    queue.put(
        {
            "seconds": seconds,
            "peak_mib": peak_mib,
            "steps": len(batches),
            "completion_tokens": sum(int(batch["completion_mask"][:, 1:].sum()) for batch in batches),
            "batch_tokens": sum(batch["input_ids"].numel() for batch in batches),
            "real_tokens": sum(len(row["prompt_ids"]) + len(row["completion_ids"]) for row in dataset),
            "loss_sum": loss_sum,
        }
    )


def _report(variant: str, r: dict) -> None:
    padding = 1 - r["real_tokens"] / r["batch_tokens"]
    print(
        f"{variant:>16}: {r['steps']} steps, {r['completion_tokens']} completion tokens, padding {padding:6.1%}, "
        f"time {r['seconds']:6.1f} s, {r['completion_tokens'] / r['seconds']:7.0f} completion tokens/s, "
        f"peak {r['peak_mib']:6.0f} MiB, loss sum {r['loss_sum']:.6g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--num_sequences", type=int, default=32)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--min_completion_length", type=int, default=32)
    parser.add_argument("--max_completion_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    print(
        f"Llama: vocab {args.vocab_size}, hidden {args.hidden_size}, {args.num_layers} layers, "
        f"{args.attn_implementation}, fp32 on {measure.device().type}; "
        f"{args.num_sequences} sequences (prompts 16-64, completions {args.min_completion_length}-"
        f"{args.max_completion_length} tokens), micro-batches of {args.batch_size}, one epoch"
    )
    print(f"memory: {measure.memory_method('the epoch')}; torch threads {torch.get_num_threads()}")
    results = measure.run_in_children(_run, args.variants, args, _report)
    if "padded" in results:
        padded = results["padded"]
        for variant, r in results.items():
            if variant != "padded":
                print(
                    f"{variant}/padded: completion tokens/s "
                    f"{(r['completion_tokens'] / r['seconds']) / (padded['completion_tokens'] / padded['seconds']):.2f}"
                    f", peak memory {r['peak_mib'] / padded['peak_mib']:.2f}, "
                    f"loss sum difference {abs(r['loss_sum'] - padded['loss_sum']):.3g}"
                )


if __name__ == "__main__":
    main()
