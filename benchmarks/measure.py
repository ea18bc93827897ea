"""What the memory and padding benchmarks share: a random Llama, one timed and memory-measured piece of work, and
running each variant in a fresh child process (so one variant's allocations never count against the next)."""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable
from queue import Empty

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_llama(vocab_size: int, hidden_size: int, num_layers: int, **kwargs) -> torch.nn.Module:
    """A randomly initialized Llama in training mode on `device()`; `kwargs` go to `from_config`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, **kwargs).to(device()).train()


def memory_method(what: str) -> str:
    """How `measured` counts memory, for the benchmark's header."""
    if torch.cuda.is_available():
        return f"torch.cuda.max_memory_allocated during {what}"
    return f"CPU: peak resident set (getrusage ru_maxrss) minus resident set before {what}"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measured(work: Callable[[], object]) -> tuple[object, float, float]:
    """(result, seconds, peak MiB above what was in use before) of `work()`: CUDA's allocator peak on a GPU, the
    process's peak resident set on CPU (so model weights, inputs and the torch runtime are not counted)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    start = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result, time.perf_counter() - start, peak - before


def run_in_children(target: Callable, variants: list[str], args, report: Callable[[str, dict], None]) -> dict:
    """`target(variant, args, queue)` in a fresh spawned process per variant; `report` prints each result."""
    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in variants:
        queue = context.Queue()
        child = context.Process(target=target, args=(variant, args, queue))
        child.start()
        while True:  # a child that dies never answers: notice it instead of waiting forever
            try:
                results[variant] = queue.get(timeout=5)
                break
            except Empty:
                if not child.is_alive():
                    raise RuntimeError(
                        f"{variant} failed (exit code {child.exitcode}); its traceback is above"
                    ) from None
        child.join()
        report(variant, results[variant])
    return results
