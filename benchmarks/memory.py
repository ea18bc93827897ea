"""Peak memory and time of one forward+backward of the weighted loss: full logits vs the chunked lm_head.

A random Llama-like model with a large vocabulary and long completions, the same batch for every variant:

    full     model(...).logits over the whole batch, then `completion_logprobs` (the path before chunking)
    chunked  `model_completion_logprobs(..., chunk_size=C)`: the lm_head + log-softmax on C completion positions at
             a time, each chunk checkpointed (the `--logits_chunk_size` training path)
    hf       for reference: the model's own loss, `model(..., labels=...)`, as SFT/TRL trainers compute it

Each variant runs in a fresh child process. On CUDA the figure is `torch.cuda.max_memory_allocated` during the step
(minus what was allocated before it); on CPU it is the child's peak resident set (`getrusage` ru_maxrss) minus its
resident set just before the step, so model weights, inputs and the torch runtime are not counted.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                          # vocab 32k, 8 x (64 + 1024) tokens
    python benchmarks/memory.py --vocab_size 65536 --chunk_size 512
"""

from __future__ import annotations

import argparse

import measure
import torch

from rlfree.lm.logprobs import completion_logprobs, model_completion_logprobs


def _run(variant: str, args: argparse.Namespace, queue) -> None:
    device = measure.device()
    model = measure.random_llama(args.vocab_size, args.hidden_size, args.num_layers)
    width = args.prompt_length + args.completion_length
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, width), device=device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, args.prompt_length :] = 1
    weight = torch.rand(args.batch_size, device=device)

    def step():
        if variant == "full":
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = -(weight * completion_logprobs(logits, input_ids, completion_mask)).sum()
        elif variant == "chunked":
            (logprob,) = model_completion_logprobs(
                model, input_ids, attention_mask, completion_mask, chunk_size=args.chunk_size
            )
            loss = -(weight * logprob).sum()
        else:
            labels = input_ids.masked_fill(completion_mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss.item()

    loss, seconds, peak_mib = measure.measured(step)
    queue.put({"peak_mib": peak_mib, "seconds": seconds, "loss": loss})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--completion_length", type=int, default=1024)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["full", "chunked", "hf"], choices=["full", "chunked", "hf"])
    args = parser.parse_args()

    print(
        f"vocab {args.vocab_size}, hidden {args.hidden_size}, {args.num_layers} layers, batch {args.batch_size} x "
        f"({args.prompt_length} prompt + {args.completion_length} completion) tokens, chunk {args.chunk_size}; "
        f"fp32 logits of the whole batch = "
        f"{args.batch_size * (args.prompt_length + args.completion_length) * args.vocab_size * 4 / 2**20:.0f} MiB"
    )
    print(f"memory: {measure.memory_method('the step')}; torch threads {torch.get_num_threads()}")
    results = measure.run_in_children(
        _run,
        args.variants,
        args,
        lambda variant, r: print(
            f"{variant:>8}: peak {r['peak_mib']:8.0f} MiB   time {r['seconds']:7.2f} s   loss {r['loss']:.6g}"
        ),
    )
    if "full" in results and "chunked" in results:
        full, chunked = results["full"], results["chunked"]
        print(
            f"chunked/full: memory {chunked['peak_mib'] / full['peak_mib']:.3f}, "
            f"time {chunked['seconds'] / full['seconds']:.2f}; "
            f"loss difference {abs(chunked['loss'] - full['loss']):.3g}"
        )


if __name__ == "__main__":
    main()
