"""How many samples per prompt does weighted MLE need: one round from pi_ref, or several rounds (`rounds: K`)?

On the enumerable toy of `rlfree demo` (16 addition prompts, completions of up to 3 tokens, every one enumerated),
this runs the real recipe driver (`rlfree.stages.run.run_recipe`) with 3 rounds for each N (samples per prompt per
round). Round k + 1 samples from round k's model and corrects exactly towards the fixed target pi_ref * exp(r / beta).
After each round it computes the exact KL(pi* || pi_theta) / KL(pi* || pi_ref) and reports, for each number of
rounds, the fewest total samples per prompt (rounds x N) that bring the ratio to 0.1 or below.

    python benchmarks/rounds.py                      # beta 0.5 and 0.25, seeds 0 and 1 (a few minutes on 2 cores)
    python benchmarks/rounds.py --betas 0.5 --seeds 0

Training is the same every round: a fixed number of optimizer steps (--max_steps), so that small N is not also
under-trained; every round trains from pi_ref on its own round's samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rlfree import toy
from rlfree.lm.loading import load_causal_lm
from rlfree.stages.run import RunConfig, run_recipe

NUM_PROMPTS = 16
MAX_NEW_TOKENS = 3
BAR = 0.1


def recipe(work: Path, reference: Path, prompts: Path, num_samples: int, beta: float, seed: int, max_steps: int):
    return {
        "seed": seed,
        "generate": {
            "model_name_or_path": str(reference),
            "prompts": str(prompts),
            "num_samples": num_samples,
            "max_new_tokens": MAX_NEW_TOKENS,
            "batch_size": 512,
            "output_dir": str(work / "generated"),
        },
        "score": {
            "input_dir": str(work / "generated"),
            "reward": "rlfree.toy:arithmetic_reward",
            "output_dir": str(work / "scored"),
        },
        "weight": {"input_dir": str(work / "scored"), "beta": beta, "output_dir": str(work / "weighted")},
        "train": {
            "model_name_or_path": str(reference),
            "dataset_dir": str(work / "weighted"),
            "output_dir": str(work / "model"),
            "max_steps": max_steps,
            "learning_rate": 2e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 5,
            "per_device_train_batch_size": 64,
            "report_to": "none",
            "disable_tqdm": True,
            "logging_steps": 1000,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num_samples", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--output", default=None, help="Optional JSON file for the figures.")
    args = parser.parse_args()

    start = time.time()
    root = Path(tempfile.mkdtemp(prefix="rlfree-rounds-"))
    model, tokenizer, prompt_rows = toy.write_task(root, NUM_PROMPTS, seed=0)
    exact = toy.exact_distributions(model, tokenizer, [row["prompt"] for row in prompt_rows], MAX_NEW_TOKENS)

    # ratio[beta][N][round] = mean over seeds of KL(pi* || model after that round) / KL(pi* || pi_ref)
    ratios: dict[float, dict[int, list[float]]] = {}
    for beta in args.betas:
        target = toy.tilt(exact["logprobs"], exact["rewards"], beta=beta)
        before = toy.kl(target, exact["logprobs"]).mean().item()
        ratios[beta] = {}
        for num_samples in args.num_samples:
            per_seed = []
            for seed in args.seeds:
                work = root / f"beta{beta}_n{num_samples}_seed{seed}"
                work.mkdir()
                (work / "recipe.yaml").write_text(
                    json.dumps(
                        recipe(
                            work, root / "reference", root / "prompts.jsonl", num_samples, beta, seed, args.max_steps
                        )
                    )
                )
                models = run_recipe(str(work / "recipe.yaml"), RunConfig(rounds=args.rounds))
                after = []
                for path in models:
                    trained = load_causal_lm(path, device=torch.device("cpu"))
                    logprobs = toy.exact_distributions(
                        trained, tokenizer, [row["prompt"] for row in prompt_rows], MAX_NEW_TOKENS
                    )["logprobs"]
                    after.append(toy.kl(target, logprobs).mean().item() / before)
                per_seed.append(after)
            ratios[beta][num_samples] = [sum(column) / len(column) for column in zip(*per_seed, strict=True)]
            print(f"beta={beta} N={num_samples}: ratio after rounds 1..{args.rounds} = {ratios[beta][num_samples]}")

    print(f"\nexact KL(pi* || pi_theta) / KL(pi* || pi_ref), mean of seeds {args.seeds}; {args.max_steps} steps/round")
    for beta in args.betas:
        target = toy.tilt(exact["logprobs"], exact["rewards"], beta=beta)
        print(f"\nbeta = {beta}  (KL(pi* || pi_ref) = {toy.kl(target, exact['logprobs']).mean().item():.4f})")
        print(
            f"{'N per round':>12}"
            + "".join(f"{f'{k} round' + ('s' if k > 1 else ''):>12}" for k in range(1, args.rounds + 1))
        )
        for num_samples, row in ratios[beta].items():
            print(f"{num_samples:>12}" + "".join(f"{value:>12.3f}" for value in row))
        print(f"fewest total samples per prompt (rounds x N) reaching ratio <= {BAR}:")
        for k in range(1, args.rounds + 1):
            reached = [k * n for n, row in ratios[beta].items() if row[k - 1] <= BAR]
            print(f"  {k} round{'s' if k > 1 else ' '}: {min(reached) if reached else 'not reached'}")
    print(f"\ntook {time.time() - start:.0f} s; work files in {root}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
