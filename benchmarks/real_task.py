"""The headline table on a real model: rlfree against soft best-of-N, TRL's RLOO and TRL's GRPO on SmolLM2-135M.

Two tasks on the packaged SmolLM2-135M-Instruct (`make install` ships it), each with training prompts and held-out
prompts:

- `addition`: "What is 7 + 3? Reply with just the number.", a verifiable 0/1 reward (the number the completion ends
  on is the sum; `rlfree.rewards.verifiers:gsm8k_accuracy`), the prompts of `make demo`, beta = 0.1;
- `capitals`: "What is the capital of Peru? Answer in one word.", a graded scorer (`capital_reward` below: 1 for the
  right city in one or two words, less the longer the answer, 0 without it), beta = 0.25.

Per task, in one run:
- pi* at that beta, estimated from `--num_reference_samples` pi_ref samples per prompt by self-normalized importance
  sampling: E_pi*[r] = sum_i w_i r_i and KL(pi* || pi_ref) = sum_i w_i log(M w_i) with w = softmax(r / beta) per
  prompt, and the ESS 1 / sum w^2 that says how far to trust them (the plug-in KL is at most log M);
- pi_ref, from the same samples;
- rlfree, one round and two (`rlfree run --rounds 2`: round 2 samples from round 1's model, corrected to the same
  pi_ref * exp(r / beta)), with the recipe of `make demo`;
- soft best-of-N at the same beta, N = 8 and 16, from the same pi_ref samples (the expected reward of the pick given
  each group of N candidates; its cost is N samples per pick, paid at every use);
- TRL's RLOO (`rlfree baseline`, KL coefficient beta) and TRL's GRPO (its defaults: no KL term, rewards scaled per
  group), each given `--budget_ratio` times rlfree's one-round wall-clock (a callback stops them).
Trained models are evaluated with `rlfree evaluate` (4 samples per prompt, mean reward and KL to pi_ref, k1 and k3,
with 95% bootstrap intervals over prompts) on the training and the held-out prompts. Each method runs in its own
child process: its wall seconds and peak resident memory are its own (loading torch and the model included).

    python benchmarks/real_task.py                       # both tasks; about 50 minutes on 2 CPU cores
    python benchmarks/real_task.py --tasks addition      # one
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import resource
import tempfile
import time
from pathlib import Path

import measure
import numpy as np
from datasets import load_from_disk
from transformers import TrainerCallback

from rlfree.sources import packaged_model

REPOSITORY = Path(__file__).resolve().parents[1]
ADDITION = "rlfree.rewards.verifiers:gsm8k_accuracy"
CAPITAL = f"{Path(__file__).resolve()}:capital_reward"
MAX_NEW_TOKENS = 12
EVAL_SAMPLES = 4
TRAINING = {"learning_rate": 2e-5, "num_train_epochs": 2, "per_device_train_batch_size": 8}
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima",
    "Germany": "Berlin", "Spain": "Madrid", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Brazil": "Brasilia", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Chile": "Santiago",
    "Colombia": "Bogota", "Kenya": "Nairobi", "Nigeria": "Abuja", "Greece": "Athens", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "South Korea": "Seoul", "Australia": "Canberra", "New Zealand": "Wellington",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "Portugal": "Lisbon", "Ireland": "Dublin", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Czech Republic": "Prague", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Cuba": "Havana", "Venezuela": "Caracas", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Morocco": "Rabat", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Malaysia": "Kuala Lumpur", "Israel": "Jerusalem", "Syria": "Damascus", "Afghanistan": "Kabul",
}  # fmt: skip


def capital_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 for the right capital in at most two words (three for a two-word city), 0.8^extra words beyond that, 0
    without it: right and short, as a GRPO user would write a graded correctness-and-brevity reward."""
    from rlfree.rewards.verifiers import completion_text

    rewards = []
    for completion, city in zip(completions, answer, strict=True):
        text = completion_text(completion)
        words = len(re.findall(r"\w+", text))
        allowed = len(city.split()) + 1
        right = city.lower() in text.lower()
        rewards.append(float(right) * 0.8 ** max(0, words - allowed))
    return rewards


def write_tasks(folder: Path) -> dict[str, dict]:
    """The prompt files of both tasks: addition's are `make demo`'s, capitals' 32 train / 24 held out."""
    countries = sorted(CAPITALS)
    random.Random(0).shuffle(countries)
    rows = [
        {"messages": [{"role": "user", "content": f"What is the capital of {c}? Answer in one word."}],
         "answer": CAPITALS[c]}
        for c in countries
    ]  # fmt: skip
    for name, part in (("train", rows[:32]), ("heldout", rows[32:56])):
        (folder / f"capitals_{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    return {
        "addition": {
            "train": str(REPOSITORY / "recipes/addition_train.jsonl"),
            "heldout": str(REPOSITORY / "recipes/addition_heldout.jsonl"),
            "reward": ADDITION,
            "beta": 0.1,
        },
        "capitals": {
            "train": str(folder / "capitals_train.jsonl"),
            "heldout": str(folder / "capitals_heldout.jsonl"),
            "reward": CAPITAL,
            "beta": 0.25,
        },
    }


# --- the methods, each in a child process --------------------------------------------------------------------------


class StopAfter(TrainerCallback):
    """Stops training once `seconds` of wall-clock have passed since training began (checked after each step)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.started >= self.seconds:
            control.should_training_stop = True


def reference_samples(spec: dict) -> dict:
    """M pi_ref samples per prompt on both prompt sets, scored."""
    from rlfree.stages.generate import GenerateConfig, generate
    from rlfree.stages.score import ScoreConfig, score

    for part in ("train", "heldout"):
        generate(
            GenerateConfig(
                model_name_or_path=spec["model"], prompts=spec[part], output_dir=f"{spec['work']}/ref_{part}/generated",
                num_samples=spec["num_reference_samples"], max_new_tokens=MAX_NEW_TOKENS, seed=1,
            )
        )  # fmt: skip
        score(
            ScoreConfig(
                input_dir=f"{spec['work']}/ref_{part}/generated", output_dir=f"{spec['work']}/ref_{part}/scored",
                reward=[spec["reward"]],
            )
        )  # fmt: skip
    return {"samples": spec["num_reference_samples"] * sum(num_prompts(spec[part]) for part in ("train", "heldout"))}


def num_prompts(path: str) -> int:
    return len(Path(path).read_text().splitlines())


def write_recipe(spec: dict) -> str:
    """`make demo`'s recipe with this task's prompts, reward and beta, in the task's work folder."""
    import yaml

    recipe = yaml.safe_load((REPOSITORY / "recipes/smollm2_addition.yaml").read_text())
    recipe.pop("ab")
    recipe["model_name_or_path"] = spec["model"]
    for stage in ("generate", "score", "weight", "train"):
        section = recipe[stage]
        for key in ("output_dir", "input_dir", "dataset_dir"):
            if key in section:
                section[key] = section[key].replace("smollm2_demo", f"{spec['work']}/rlfree")
    recipe["generate"]["prompts"] = spec["train"]
    recipe["score"]["reward"] = [spec["reward"]]
    recipe["weight"]["beta"] = spec["beta"]
    path = Path(spec["work"]) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def rlfree_rounds(spec: dict, rounds: int) -> dict:
    from rlfree.stages.run import RunConfig, run_recipe

    models = run_recipe(write_recipe(spec), RunConfig(rounds=rounds))
    samples = num_prompts(spec["train"]) * 8 * rounds
    return {"model": models[-1], "samples": samples}


def rloo(spec: dict) -> dict:
    from rlfree.baselines.rloo import BaselineConfig, BaselineRLOOConfig, train_baseline

    output = f"{spec['work']}/rloo"
    trainer = train_baseline(
        BaselineConfig(
            model_name_or_path=spec["model"], prompts=spec["train"], reward=[spec["reward"]],
            max_new_tokens=MAX_NEW_TOKENS,
        ),
        BaselineRLOOConfig(output_dir=output, beta=spec["beta"], **rl_settings(spec)),
        callbacks=[StopAfter(spec["budget_s"])],
    )  # fmt: skip
    return {"model": output, "samples": trainer.state.global_step * RL_BATCH}


RL_BATCH = 16  # completions per optimizer step: 2 prompts x 8 generations


def rl_settings(spec: dict) -> dict:
    """What RLOO and GRPO share: 8 generations per prompt, 16 completions per step, rlfree's learning rate, a
    constant schedule (the wall-clock budget, not max_steps, ends them), seeded."""
    return {
        "num_generations": 8, "per_device_train_batch_size": RL_BATCH, "learning_rate": TRAINING["learning_rate"],
        "lr_scheduler_type": "constant", "max_steps": 10_000, "max_completion_length": MAX_NEW_TOKENS,
        "seed": 0, "report_to": "none", "save_strategy": "no", "logging_steps": 5, "disable_tqdm": True,
    }  # fmt: skip


def grpo(spec: dict) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from rlfree.baselines.rloo import trl_prompts
    from rlfree.lm.loading import load_tokenizer
    from rlfree.rewards.scoring import load_reward_function
    from rlfree.sources import model_folder

    output = f"{spec['work']}/grpo"
    on_cpu = torch.accelerator.current_accelerator() is None
    trainer = GRPOTrainer(
        model=model_folder(spec["model"]),
        reward_funcs=[load_reward_function(spec["reward"])],
        args=GRPOConfig(output_dir=output, use_cpu=on_cpu, bf16=not on_cpu, **rl_settings(spec)),
        train_dataset=trl_prompts(spec["train"]),
        processing_class=load_tokenizer(spec["model"]),
        callbacks=[StopAfter(spec["budget_s"])],
    )
    trainer.train()
    trainer.save_model(output)
    return {"model": output, "samples": trainer.state.global_step * RL_BATCH}


METHODS = {
    "reference samples": reference_samples,
    "rlfree (1 round)": lambda spec: rlfree_rounds(spec, 1),
    "rlfree (2 rounds)": lambda spec: rlfree_rounds(spec, 2),
    "TRL RLOO": rloo,
    "TRL GRPO": grpo,
}


def _child(method: str, spec: dict, queue) -> None:
    started = time.perf_counter()
    figures = METHODS[method](spec)
    figures["seconds"] = time.perf_counter() - started
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(figures)


def _evaluate_child(name: str, spec: dict, queue) -> None:
    from rlfree.evaluation.evaluate import EvaluateConfig, evaluate

    reports = {}
    for part in ("train", "heldout"):
        reports[part] = evaluate(
            EvaluateConfig(
                model_name_or_path=spec["models"][name], ref_model=spec["model"], prompts=spec[part],
                output_dir=f"{spec['work']}/eval/{name.replace(' ', '_')}/{part}", reward=[spec["reward"]],
                num_samples=EVAL_SAMPLES, max_new_tokens=MAX_NEW_TOKENS, seed=2,
            )
        )  # fmt: skip
    queue.put(reports)


# --- pi*, pi_ref and soft best-of-N from the reference samples -------------------------------------------------------


def per_prompt_rewards(folder: str) -> np.ndarray:
    """[prompt, sample] rewards of a scored folder."""
    from rlfree.evaluation.evaluate import by_prompt

    return by_prompt(load_from_disk(folder), "reward")


def with_interval(name: str, per_prompt: np.ndarray) -> dict:
    from rlfree.evaluation.evaluate import estimate

    return estimate(name, per_prompt, 0.95, 1000, 0)


def target_figures(rewards: np.ndarray, beta: float) -> dict:
    """pi* by self-normalized importance sampling over pi_ref's samples, per prompt: E[r], KL(pi* || pi_ref), ESS."""
    logits = rewards / beta
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    count = rewards.shape[1]
    kl = (weights * np.log(np.clip(weights * count, 1e-300, None))).sum(axis=1)
    ess = 1 / (weights**2).sum(axis=1)
    return (
        with_interval("mean_reward", (weights * rewards).sum(axis=1))
        | with_interval("kl_k1", kl)
        | {"ess_median": float(np.median(ess)), "ess_min": float(ess.min()), "kl_ceiling": math.log(count)}
    )


def soft_best_of_n(rewards: np.ndarray, beta: float, n: int) -> np.ndarray:
    """Per prompt, the expected reward of a soft best-of-n pick, averaged over the disjoint groups of n samples."""
    groups = rewards[:, : rewards.shape[1] // n * n].reshape(rewards.shape[0], -1, n)
    logits = groups / beta
    picks = np.exp(logits - logits.max(axis=2, keepdims=True))
    picks /= picks.sum(axis=2, keepdims=True)
    return (picks * groups).sum(axis=2).mean(axis=1)


def format_figure(report: dict, name: str) -> str:
    if name not in report:
        return "n/a"
    low, high = report[f"{name}_ci"]
    return f"{report[name]:.3f} [{low:.3f}, {high:.3f}]"


def run_methods(methods: list[str], spec: dict) -> dict[str, dict]:
    """Each method in a child process; a method that finished in an earlier run over the same --work_dir is not run
    again (its figures are kept in figures/ beside its outputs), so a run that failed half-way resumes."""
    saved = Path(spec["work"]) / "figures"
    saved.mkdir(parents=True, exist_ok=True)
    done = {m: json.loads((saved / f"{m}.json").read_text()) for m in methods if (saved / f"{m}.json").is_file()}
    for method, figures in done.items():
        print(f"{method}: finished in an earlier run {figures}")

    def keep(method: str, figures: dict) -> None:
        (saved / f"{method}.json").write_text(json.dumps(figures) + "\n")
        print(method, figures)

    return done | measure.run_in_children(_child, [m for m in methods if m not in done], spec, keep)


def run_task(task: str, spec: dict, args) -> list[dict]:
    print(f"\n=== {task}: beta {spec['beta']}, reward {spec['reward']}")
    measured = run_methods(["reference samples", "rlfree (1 round)"], spec)
    spec["budget_s"] = args.budget_ratio * measured["rlfree (1 round)"]["seconds"]
    measured |= run_methods(["rlfree (2 rounds)", "TRL RLOO", "TRL GRPO"], spec)
    # Round 2 resumed round 1's finished folders: its cost is both rounds'.
    first, both = measured["rlfree (1 round)"], measured["rlfree (2 rounds)"]
    both["seconds"] += first["seconds"]
    both["peak_rss_mib"] = max(both["peak_rss_mib"], first["peak_rss_mib"])
    reference = measured.pop("reference samples")
    spec["models"] = {name: figures["model"] for name, figures in measured.items()}
    reports = measure.run_in_children(_evaluate_child, list(spec["models"]), spec, lambda m, r: None)
    rewards = {part: per_prompt_rewards(f"{spec['work']}/ref_{part}/scored") for part in ("train", "heldout")}
    per_sample_s = reference["seconds"] / reference["samples"]
    rows = []
    for part in ("train", "heldout"):
        rows.append({"method": "pi* (SNIS estimate)", "part": part} | target_figures(rewards[part], spec["beta"]))
        rows.append(
            {"method": "pi_ref", "part": part, "samples": 1, "seconds": per_sample_s, "peak_rss_mib": reference["peak_rss_mib"]}
            | with_interval("mean_reward", rewards[part].mean(axis=1))
            | {"kl_k1": 0.0, "kl_k1_ci": [0.0, 0.0]}
        )  # fmt: skip
        for n in (8, 16):
            rows.append(
                {"method": f"soft best-of-{n}", "part": part, "samples": n, "seconds": n * per_sample_s,
                 "peak_rss_mib": reference["peak_rss_mib"]}
                | with_interval("mean_reward", soft_best_of_n(rewards[part], spec["beta"], n))
            )  # fmt: skip
        for name, figures in measured.items():
            report = reports[name][part]
            rows.append(
                {"method": name, "part": part, "samples": figures["samples"], "seconds": figures["seconds"],
                 "peak_rss_mib": figures["peak_rss_mib"]}
                | {key: report[key] for key in report if key.startswith(("mean_reward", "kl_"))}
            )  # fmt: skip
    print_table(task, spec, rows)
    return rows


def print_table(task: str, spec: dict, rows: list[dict]) -> None:
    header = (
        f"{'method':<22}{'prompts':<9}{'mean reward [95%]':>24}{'KL k1 [95%]':>24}{'KL k3 [95%]':>24}"
        f"{'samples':>9}{'wall s':>8}{'peak MiB':>10}"
    )
    print(f"\n{task} (beta {spec['beta']}); soft best-of-N and pi_ref: samples and seconds per pick")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        cost = (
            f"{row['samples']:>9.0f}{row['seconds']:>8.1f}{row['peak_rss_mib']:>10.0f}"
            if "seconds" in row
            else f"   ESS median {row['ess_median']:.1f} / min {row['ess_min']:.1f} (KL ceiling log M = {row['kl_ceiling']:.2f})"
        )
        print(
            f"{row['method']:<22}{row['part']:<9}{format_figure(row, 'mean_reward'):>24}"
            f"{format_figure(row, 'kl_k1'):>24}{format_figure(row, 'kl_k3'):>24}{cost}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=["addition", "capitals"], default=["addition", "capitals"])
    parser.add_argument("--num_reference_samples", type=int, default=16, help="pi_ref samples per prompt for pi*.")
    parser.add_argument("--budget_ratio", type=float, default=3.0, help="RLOO's and GRPO's wall-clock / rlfree's.")
    parser.add_argument("--output", default=None, help="Optional JSON file for the figures.")
    parser.add_argument(
        "--work_dir", default=None, help="Where datasets, models and figures go (default: a new temporary folder); "
        "a rerun over the same folder keeps the methods that finished."
    )  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rlfree-real-task-"))
    work.mkdir(parents=True, exist_ok=True)
    tasks = write_tasks(work)
    results = {}
    for task in args.tasks:
        spec = tasks[task] | {
            "model": str(packaged_model()), "work": str(work / task), "num_reference_samples": args.num_reference_samples
        }  # fmt: skip
        results[task] = run_task(task, spec, args)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwork folder (datasets, models, evaluations): {work}")


if __name__ == "__main__":
    main()
