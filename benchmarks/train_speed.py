"""`rlfree train`'s trainer against TRL's `SFTTrainer` on identical data at real size: SmolLM2-135M-Instruct.

Both train the packaged SmolLM2-135M-Instruct (`make install` ships it) on the same token ids: `--num_sequences` rows
of a `--prompt_tokens` prompt and a `--completion_tokens` completion (random ids: the speed does not depend on what
they say), `--batch_size` rows per step, the loss on completion tokens only (SFTTrainer's `completion_mask`; rlfree's
weighted cross-entropy, every weight 1). Variants, each in a fresh child process:

    rlfree        RLFreeTrainer (what `rlfree train` runs), full fine-tuning, float32
    sft           TRL SFTTrainer, full fine-tuning, float32
    rlfree-lora   RLFreeTrainer with LoRA r=16 on all linear layers (`--use_peft`)
    sft-lora      SFTTrainer with the same LoraConfig
    rlfree-bf16   RLFreeTrainer with `--bf16` (autocast to bfloat16 on the CPU)

Completion tokens per second count the steps after the first (the first pays one-time allocation); peak memory is the
child's peak resident set minus its resident set before training (model weights not counted; gradients, optimizer
state and activations are). Ratios are against SFTTrainer's variant of the same kind, measured in the same run.

    OMP_NUM_THREADS=2 python benchmarks/train_speed.py     # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
import time

import measure
import torch
from datasets import Dataset
from transformers import TrainerCallback

from rlfree.sources import model_folder, packaged_model

VARIANTS = ["rlfree", "sft", "rlfree-lora", "sft-lora", "rlfree-bf16"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def token_rows(args) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(100, 49000, (args.prompt_tokens,), generator=generator).tolist(),
            torch.randint(100, 49000, (args.completion_tokens,), generator=generator).tolist(),
        )
        for _ in range(args.num_sequences)
    ]


class StepTimes(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def common(args, output: str) -> dict:
    return {
        "output_dir": output, "per_device_train_batch_size": args.batch_size, "learning_rate": 2e-5,
        "max_steps": args.num_sequences // args.batch_size, "report_to": "none", "save_strategy": "no",
        "logging_steps": 1000, "disable_tqdm": True, "seed": 0,
    }  # fmt: skip


def rlfree_trainer(variant: str, args, rows, output: str, callback: StepTimes):
    from rlfree.lm.loading import load_tokenizer
    from rlfree.lm.trainer import RLFreeTrainer, build_model
    from rlfree.training import ModelConfig, RLFreeConfig

    model_config = ModelConfig(model_name_or_path=args.model, use_peft=variant == "rlfree-lora")
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [prompt for prompt, _ in rows],
            "completion_ids": [completion for _, completion in rows],
            "weight": [1.0] * len(rows),
            "prompt_index": list(range(len(rows))),
        }
    )
    config = RLFreeConfig(**common(args, output), dataset_dir=output, bf16=variant == "rlfree-bf16")
    trainer = RLFreeTrainer(build_model(model_config), config, dataset, load_tokenizer(args.model))
    trainer.add_callback(callback)
    return trainer


def sft_trainer(variant: str, args, rows, output: str, callback: StepTimes):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlfree.lm.loading import load_tokenizer

    dataset = Dataset.from_dict(
        {
            "input_ids": [prompt + completion for prompt, completion in rows],
            "completion_mask": [[0] * len(prompt) + [1] * len(completion) for prompt, completion in rows],
        }
    )
    on_cpu = torch.accelerator.current_accelerator() is None
    config = SFTConfig(**common(args, output), use_cpu=on_cpu, bf16=False, max_length=None)
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model),
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(args.model),
        peft_config=LoraConfig(**LORA) if variant == "sft-lora" else None,
        callbacks=[callback],
    )


def run_variant(variant: str, args, queue) -> None:
    rows = token_rows(args)
    callback = StepTimes()
    with tempfile.TemporaryDirectory() as output:
        build = rlfree_trainer if variant.startswith("rlfree") else sft_trainer
        trainer = build(variant, args, rows, output, callback)
        _, seconds, peak = measure.measured(trainer.train)
    timed_steps = len(callback.times) - 1
    tokens = timed_steps * args.batch_size * args.completion_tokens
    queue.put(
        {"tokens_per_s": tokens / (callback.times[-1] - callback.times[0]), "seconds": seconds, "peak_mib": peak,
         "steps": len(callback.times)}
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_sequences", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=48)
    parser.add_argument("--completion_tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    args = parser.parse_args()
    args.model = model_folder(str(packaged_model()))
    print(
        f"{args.num_sequences} rows of {args.prompt_tokens} + {args.completion_tokens} tokens, {args.batch_size} per "
        f"step; memory: {measure.memory_method('training')}"
    )
    results = measure.run_in_children(run_variant, args.variants, args, lambda v, r: print(v, r))
    print(f"\n{'variant':<13}{'completion tok/s':>17}{'peak MiB':>10}   vs SFTTrainer: tok/s  memory")
    for variant, result in results.items():
        peer = results.get("sft-lora" if "lora" in variant else "sft")
        line = f"{variant:<13}{result['tokens_per_s']:>17.0f}{result['peak_mib']:>10.0f}"
        if peer is not None and not variant.startswith("sft"):
            line += f"   {result['tokens_per_s'] / peer['tokens_per_s']:>18.2f}x{result['peak_mib'] / peer['peak_mib']:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()
