"""`rlfree baseline`: the on-policy RL baseline on the same prompts, reward and beta, with TRL's RLOOTrainer.

RLOO is the PPO-family method whose objective is exactly the one rlfree solves in closed form: TRL's RLOOTrainer
subtracts beta * sum_t log(pi_theta / pi_ref) from each completion's reward (a sequence-level KL penalty) and weights
the sequence log-likelihood by the leave-one-out advantage, so its optimum is pi_ref * exp(r / beta) for the same
beta. GRPO is not used as the default baseline: its KL is a per-token k3 term averaged over tokens and its rewards
are std-normalized by default, so its beta is not the beta of that target. PPO is gone from current TRL releases
(the last ones with `trl.experimental.ppo` need a reward *model* and a value head, not a reward function).

TRL is an optional extra: `pip install -e ".[baselines]"` from a checkout. Every `RLOOConfig` flag is accepted, and the flags
rlfree shares with it (`--beta`, `--reward`, `--prompts`, `--model_name_or_path`) mean the same, so one recipe's
top-level keys drive both methods on the same footing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import RLOOConfig, RLOOTrainer

from ..data import load_prompts
from ..errors import StageInputError, check_finite
from ..lm.loading import load_tokenizer
from ..options import reward_functions_field
from ..rewards.scoring import load_reward_function
from ..sources import model_folder


@dataclass
class BaselineRLOOConfig(RLOOConfig):
    """TRL's RLOOConfig, made CPU-aware like `RLFreeConfig`."""

    def __post_init__(self):
        check_finite(self)
        if torch.accelerator.current_accelerator() is None:
            # RLOOConfig defaults to bf16, which refuses to start on a CPU-only machine; train in fp32 there.
            self.use_cpu, self.bf16 = True, False
        super().__post_init__()


@dataclass
class BaselineConfig:
    """What `rlfree baseline` adds to TRL's RLOOConfig: the same model, prompt and reward flags as rlfree."""

    model_name_or_path: str = field(metadata={"help": "Reference model pi_ref, and the policy's initialization."})
    prompts: str = field(metadata={"help": "Prompt set, as for `rlfree generate` ('prompt' or 'messages')."})
    reward: list[str] = reward_functions_field()
    prompts_split: str = field(default="train", metadata={"help": "Split to read when --prompts is a Hub dataset."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest completion (sets RLOOConfig's max_completion_length)."}
    )

    def __post_init__(self):
        check_finite(self)
        if not self.reward:
            raise StageInputError("give at least one --reward path/to/file.py:FUNC")


def trl_prompts(prompts: str, split: str = "train") -> Dataset:
    """A prompt set as TRL's trainers read it: a chat (rlfree's `messages`) goes under `prompt`, TRL's
    conversational format."""
    dataset = load_prompts(prompts, split)
    if "messages" in dataset.column_names:
        dataset = dataset.remove_columns([c for c in ("prompt",) if c in dataset.column_names])
        dataset = dataset.rename_column("messages", "prompt")
    return dataset


def train_baseline(
    config: BaselineConfig, args: BaselineRLOOConfig, callbacks: list[TrainerCallback] | None = None
) -> RLOOTrainer:
    """Train RLOO from `config.model_name_or_path` with KL coefficient `args.beta`; saves to `args.output_dir`.

    `callbacks` go to the trainer (from Python: a wall-clock budget, say)."""
    if not args.beta > 0:
        raise StageInputError(f"--beta must be > 0 for a KL-regularized baseline, got {args.beta}")
    if config.max_new_tokens is not None:
        args.max_completion_length = config.max_new_tokens
    trainer = RLOOTrainer(
        model=model_folder(config.model_name_or_path),
        reward_funcs=[load_reward_function(spec) for spec in config.reward],
        args=args,
        train_dataset=trl_prompts(config.prompts, config.prompts_split),
        processing_class=load_tokenizer(config.model_name_or_path, args.trust_remote_code),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def baseline_command(config: BaselineConfig, args: BaselineRLOOConfig) -> str:
    train_baseline(config, args)
    return f"wrote the RLOO baseline (beta={args.beta}) to {args.output_dir}"
