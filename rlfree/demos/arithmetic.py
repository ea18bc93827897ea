"""`rlfree demo` (the default, `--family lm`): the whole pipeline, offline, on a task whose every output can be
enumerated.

A tiny Llama is trained for seconds to add single digits, imperfectly: that is pi_ref. The demo then runs
generate -> score -> weight -> train through the same functions the CLI calls, and compares the reference, the
trained model and the exact target pi* ~ pi_ref * exp(r / beta) by exact sums over every possible completion.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import load_from_disk

from .. import toy
from ..lm.loading import load_causal_lm
from ..stages.checks import check_outputs
from ..stages.generate import GenerateConfig, generate
from ..stages.score import ScoreConfig, score
from ..stages.train import train
from ..stages.weight import WeightConfig, weight
from ..training import ModelConfig, RLFreeConfig
from . import DemoConfig

REWARD = "rlfree.toy:arithmetic_reward"


def exact_report(logprobs: torch.Tensor, reference: dict) -> dict[str, float]:
    """Exact mean reward, accuracy, KL(pi_theta || pi_ref) and KL(pi* || pi_theta) of a model's enumeration."""
    mean_reward, accuracy = toy.accuracy_and_reward(logprobs, reference["rewards"])
    return {
        "mean_reward": mean_reward,
        "accuracy": accuracy,
        "kl_to_ref": toy.kl(logprobs, reference["logprobs"]).mean().item(),
        "kl_from_target": toy.kl(reference["target"], logprobs).mean().item(),
    }


def target_logprobs(reference: dict, config: DemoConfig) -> torch.Tensor:
    if config.weighting == "rlhf":
        return toy.tilt(reference["logprobs"], reference["rewards"], beta=config.beta)
    return toy.tilt(reference["logprobs"], rlif_exponent=config.rlif_exponent)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = f"{'model':<22}{'mean reward':>12}{'accuracy':>10}{'KL(. || pi_ref)':>17}{'KL(pi* || .)':>14}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(
            f"{name:<22}{row['mean_reward']:>12.3f}{row['accuracy']:>10.3f}"
            f"{row['kl_to_ref']:>17.4f}{row['kl_from_target']:>14.4f}"
        )
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, float]], weights: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(rows)
    left.bar(names, [rows[name]["mean_reward"] for name in names], color=["#999999", "#3b7dd8", "#2ca02c"])
    left.set_ylabel("exact mean reward")
    left.set_title("reward before / after")
    left.set_ylim(0, 1)
    right.hist(weights, bins=50, color="#3b7dd8")
    right.set_yscale("log")
    right.set_xlabel("self-normalized weight w_i")
    right.set_ylabel("samples")
    right.set_title("weight distribution")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def stage_configs(config: DemoConfig, out: Path) -> dict[str, tuple]:
    """The configs of the demo's stages (a tuple each, as the stage functions take them), each reading the one before
    it in `out` (no score stage for rlif)."""
    sampling = GenerateConfig(
        model_name_or_path=str(out / "reference"),
        prompts=str(out / "prompts.jsonl"),
        output_dir=str(out / "generated"),
        num_samples=config.num_samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        batch_size=512,
        seed=config.seed,
    )
    stages: dict[str, tuple] = {"generate": (sampling,)}
    if config.weighting == "rlhf":
        stages["score"] = (
            ScoreConfig(input_dir=sampling.output_dir, output_dir=str(out / "scored"), reward=[REWARD]),
        )
        weighting = WeightConfig(str(out / "scored"), str(out / "weighted"), "rlhf", beta=config.beta)
    else:
        weighting = WeightConfig(
            sampling.output_dir, str(out / "weighted"), "rlif", rlif_exponent=config.rlif_exponent
        )
    stages["weight"] = (weighting,)
    stages["train"] = (
        ModelConfig(model_name_or_path=str(out / "reference")),
        RLFreeConfig(
            output_dir=str(out / "model"),
            dataset_dir=weighting.output_dir,
            num_train_epochs=config.num_train_epochs,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.per_device_train_batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            seed=config.seed,
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            logging_steps=50,
        ),
    )
    return stages


def run_arithmetic_demo(config: DemoConfig) -> dict[str, dict[str, float]]:
    """Run the demo end to end; returns the exact figures per model (pi_ref, trained, pi*)."""
    start = time.time()
    out = Path(config.output_dir)
    stages = stage_configs(config, out)
    # Every stage folder is checked before step 1 rewrites the reference and the prompts: a demo run over an earlier
    # one with other settings stops here, not at step 2 with stage outputs that no longer match their reference.
    check_outputs(stages.values())
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] training a tiny reference model on noisy single-digit sums -> {out / 'reference'}")
    model, tokenizer, prompt_rows = toy.write_task(out, config.num_prompts, config.seed)

    print(f"[2/5] rlfree generate: {config.num_samples} samples x {config.num_prompts} prompts")
    generate(*stages["generate"])
    if "score" in stages:
        print(f"[3/5] rlfree score --reward {REWARD}")
        score(*stages["score"])
    else:
        print("[3/5] rlif needs no reward: skipping score")
    print(f"[4/5] rlfree weight --weighting {config.weighting}")
    weight(*stages["weight"])
    print("[5/5] rlfree train (weighted maximum likelihood)")
    train(*stages["train"])

    prompts = [row["prompt"] for row in prompt_rows]
    reference = toy.exact_distributions(model, tokenizer, prompts, config.max_new_tokens)
    reference["target"] = target_logprobs(reference, config)
    trained_model = load_causal_lm(str(out / "model"), device=torch.device("cpu"))
    trained = toy.exact_distributions(trained_model, tokenizer, prompts, config.max_new_tokens)
    target_reward, target_accuracy = toy.accuracy_and_reward(reference["target"], reference["rewards"])
    rows = {
        "pi_ref (before)": exact_report(reference["logprobs"], reference),
        "rlfree (after)": exact_report(trained["logprobs"], reference),
        "pi* (exact target)": {
            "mean_reward": target_reward,
            "accuracy": target_accuracy,
            "kl_to_ref": toy.kl(reference["target"], reference["logprobs"]).mean().item(),
            "kl_from_target": 0.0,
        },
    }
    weights = load_from_disk(str(out / "weighted"))["weight"]
    plot(rows, weights, out / "demo.png")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "results": rows}, indent=2) + "\n")
    print()
    print(format_table(rows))
    ratio = rows["rlfree (after)"]["kl_from_target"] / rows["pi_ref (before)"]["kl_from_target"]
    print(f"\nKL(pi* || trained) is {ratio:.1%} of KL(pi* || pi_ref); exact sums over every possible completion.")
    print(f"plot: {out / 'demo.png'}   figures: {out / 'results.json'}   took {time.time() - start:.0f} s")
    return rows
