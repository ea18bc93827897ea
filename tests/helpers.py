"""Functions the tests of several modules share: command lines, reward files, comparisons of rows and distributions,
and small datasets and models built in memory. Fixtures (anything set up once and handed to tests) are in conftest.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlfree import toy
from rlfree.family import family_named
from rlfree.stages.train import train
from rlfree.stages.weight import WeightConfig, weight_dataset
from rlfree.training import ModelConfig, RLFreeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"


# --- the command line ------------------------------------------------------------------------------------------------


def generate_args(reference_dir, prompts_file, output_dir, *extra) -> list:
    return [
        "generate", "--model_name_or_path", reference_dir, "--prompts", prompts_file, "--num_samples", 2,
        "--max_new_tokens", 3, "--output_dir", output_dir, *extra,
    ]  # fmt: skip


def nothing_made(path) -> bool:
    return not os.path.exists(path) and not os.path.exists(f"{path}.partial")


def one_line_error(code: int, err: str, command: str) -> bool:
    """Exit 2 with one line `rlfree COMMAND: error: ...` on stderr (after any progress bars), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("rlfree ")]
    return (
        code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"rlfree {command}: error:")
    )


# --- reward functions written to files -------------------------------------------------------------------------------


def write_reward(path, body: str) -> str:
    path.write_text(f"import math\n\n\ndef reward(prompts, completions, prompt_index, **kwargs):\n{body}\n")
    return f"{path}:reward"


def write_module(path, source: str) -> str:
    path.write_text(textwrap.dedent(source))
    return str(path)


TEXT_PROMPTS = ["a bright square", "a dark circle"]  # the text-to-image pipeline's prompts (the text_prompts fixture)


def brightness(prompts: list, completions: list, **kwargs) -> list[float]:
    return [float(np.mean(image)) for image in completions]


# --- stage datasets --------------------------------------------------------------------------------------------------


def scored_dataset() -> Dataset:
    """Two prompts of four samples with distinct rewards, proposal = pi_ref: a plug-in KL of 0.3 nats is reachable."""
    rewards = [1.0, 0.5, 0.0, -0.5, 0.0, 1.0, 0.25, 0.75]
    return Dataset.from_dict(
        {
            "prompt": ["1 + 2 ="] * 4 + ["2 + 2 ="] * 4,
            "completion": [" 3", " 4", " 5", " 6", " 3", " 4", " 5", " 6"],
            "prompt_index": [0] * 4 + [1] * 4,
            "ref_logprob": [-1.0, -2.0, -1.5, -3.0] * 2,
            "proposal_logprob": [-1.0, -2.0, -1.5, -3.0] * 2,
            "num_tokens": [2] * 8,
            "reward": rewards,
        }
    )


LOGPROBS = ("ref_logprob", "proposal_logprob")


def assert_same_rows(actual: list[dict], expected: list[dict]) -> None:
    """Equal rows: the same samples exactly; log-probabilities up to float rounding (batch shapes change matmuls)."""
    assert [{k: v for k, v in row.items() if k not in LOGPROBS} for row in actual] == [
        {k: v for k, v in row.items() if k not in LOGPROBS} for row in expected
    ]
    for name in LOGPROBS:
        assert [row[name] for row in actual] == pytest.approx([row[name] for row in expected], abs=1e-5)


# --- weights by hand -------------------------------------------------------------------------------------------------


def make_samples(prompt_index, reward=None, ref_logprob=None, proposal_logprob=None, num_tokens=None) -> Dataset:
    """A generate/score-shaped dataset; the proposal is pi_ref itself unless `proposal_logprob` says otherwise."""
    n = len(prompt_index)
    ref_logprob = [-1.0] * n if ref_logprob is None else ref_logprob
    columns = {
        "prompt": [f"prompt {q}" for q in prompt_index],
        "completion": [f"completion {i}" for i in range(n)],
        "prompt_index": list(prompt_index),
        "sample_index": list(range(n)),
        "ref_logprob": list(ref_logprob),
        "proposal_logprob": list(ref_logprob if proposal_logprob is None else proposal_logprob),
        "num_tokens": [3] * n if num_tokens is None else list(num_tokens),
    }
    if reward is not None:
        columns["reward"] = list(reward)
    return Dataset.from_dict(columns)


def weight_config(**kwargs) -> WeightConfig:
    return WeightConfig(input_dir="unused", output_dir="unused", **kwargs)


def softmax(logits: list[float]) -> list[float]:
    """Plain softmax by hand (callers keep the logits small enough for math.exp)."""
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def weigh(dataset: Dataset, cfg: WeightConfig) -> tuple[dict[str, list], dict[str, float]]:
    """`weight_dataset`, with the output columns as plain lists."""
    weighted, summary = weight_dataset(dataset, cfg, family_named("lm"))
    return weighted.to_dict(), summary


def weights_of(dataset: Dataset, cfg: WeightConfig) -> list[float]:
    return weigh(dataset, cfg)[0]["weight"]


# --- picks and distributions -----------------------------------------------------------------------------------------

# Chi-square critical values at p = 0.001, so a correct sampler fails one of these checks about 1 run in 1000.
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def replicated(log_weight: list[float], copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` groups holding the same candidates, so pick frequencies estimate the per-group probabilities."""
    size = len(log_weight)
    return torch.tensor(log_weight, dtype=torch.float64).repeat(copies), torch.arange(copies).repeat_interleave(size)


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    support = probabilities > 0
    assert counts[~support].sum() == 0, "a zero-probability candidate was picked"
    expected = counts.sum() * probabilities[support]
    return float(((counts[support] - expected) ** 2 / expected).sum())


def histogram(indices: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = torch.ones(len(indices), dtype=torch.float64) if weights is None else weights
    counts = torch.zeros(size, dtype=torch.float64).index_add(0, indices, weights)
    return counts / counts.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def exact_draw_tv(probs: torch.Tensor, size: int, draws: int = 50) -> float:
    """A generous bound on the TV an exact draw of `size` samples from `probs` has to `probs`: mean + 4 sd of 50 draws.

    A sampler off by a temperature or a dropped EOS is far beyond it (TV of tenths, not hundredths).
    """
    generator = torch.Generator().manual_seed(0)
    tvs = torch.tensor(
        [
            total_variation(histogram(torch.multinomial(probs, size, True, generator=generator), len(probs)), probs)
            for _ in range(draws)
        ]
    )
    return float(tvs.mean() + 4 * tvs.std())


def token_level_mix(exact: dict, scale: float) -> torch.Tensor:
    """Exact log p_mix(o|q) of the token-level mix softmax((1-w)·log_softmax(ref) + w·log_softmax(tuned)) per step.

    Written out here on the enumeration: the reference model's step log-probabilities are read beside the tuned
    model's through toy.completion_logprobs' warper hook.
    """
    rows = []
    for prompt in exact["prompts"]:
        prompt_ids = exact["tokenizer"](prompt)["input_ids"]

        def mix(input_ids, scores, prompt_length):
            ref = exact["models"]["ref"](input_ids=input_ids).logits[:, prompt_length - 1 :].double()
            ref = ref.log_softmax(-1).flatten(0, 1)
            return (1 - scale) * ref + scale * scores.log_softmax(-1)

        with torch.no_grad():
            rows.append(toy.completion_logprobs(exact["models"]["tuned"], prompt_ids, exact["completions"], processors=[functools.partial(mix, prompt_length=len(prompt_ids))]))  # fmt: skip
    return torch.stack(rows)


def sequence_mix(exact: dict, scale: float) -> torch.Tensor:
    """Exact log of the sequence-level mix pi_ref^(1-w)·pi_theta^w, normalized over every completion."""
    return ((1 - scale) * exact["ref"] + scale * exact["tuned"]).log_softmax(-1)


def outcomes(exact: dict, dataset, prompt_index: int) -> torch.Tensor:
    return torch.tensor([exact["index"][tuple(r["completion_ids"])] for r in dataset if r["prompt_index"] == prompt_index])  # fmt: skip


# --- weighted rows and tiny language models --------------------------------------------------------------------------

ROWS = [
    # prompt "1 + 2 =", completions of different lengths so a per-token mean would differ from the sum
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [5, 0], "weight": 0.7},
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [3, 4, 0], "weight": 0.2},
    {"prompt_index": 0, "prompt_ids": [3, 12, 4, 13], "completion_ids": [6, 6], "weight": 0.1},
    {"prompt_index": 1, "prompt_ids": [9, 12, 9, 13], "completion_ids": [3, 8, 0], "weight": 0.9},
    {"prompt_index": 1, "prompt_ids": [9, 12, 9, 13], "completion_ids": [9, 0], "weight": 0.1},
]

VOCAB_SIZE = len(toy.VOCAB)


def write_weighted(root, rows, name="weighted", sidecar=None):
    """Rows saved as a weighted dataset folder root/name, with `sidecar` as its weighting.json."""
    path = root / name
    Dataset.from_list(rows).save_to_disk(str(path))
    if sidecar:
        (path / "weighting.json").write_text(json.dumps(sidecar))
    return path


def training_args(root, dataset_dir, **overrides):
    """`rlfree train`'s RLFreeConfig writing root/out, seed 0, no reporting, no progress bars."""
    settings = {
        "output_dir": str(root / "out"),
        "dataset_dir": str(dataset_dir),
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    } | overrides
    return RLFreeConfig(**settings)


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def random_rows(lengths, seed=1) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt_index": i // 2,
            "prompt_ids": [rng.randrange(1, VOCAB_SIZE) for _ in range(prompt)],
            "completion_ids": [rng.randrange(VOCAB_SIZE) for _ in range(completion)],
            "weight": rng.uniform(0.1, 1.0),
        }
        for i, (prompt, completion) in enumerate(lengths)
    ]


def varied_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    return random_rows([(rng.randrange(1, 5), rng.randrange(1, 40)) for _ in range(count)])


# --- training a class-conditional pipeline ---------------------------------------------------------------------------

DIFFUSION_FLAGS = {
    "learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant", "seed": 0, "report_to": "none",
}  # fmt: skip


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def train_here(root, output, batch_size: int, accumulation: int, **flags) -> None:
    train(
        ModelConfig(model_name_or_path=str(root / "base")),
        RLFreeConfig(output_dir=str(output), dataset_dir=str(root / "weighted"), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, disable_tqdm=True, **DIFFUSION_FLAGS | flags),
    )  # fmt: skip


def max_deviation(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)
