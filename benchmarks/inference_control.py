"""Inference-time control on the enumerable toy: how close each sampler gets to pi*, and at what cost.

1. Guidance after training: `rlfree train` at beta (the demo's run), then for each guidance scale W the exact
   KL(pi*_{beta/W} || guided_W) next to KL(pi*_{beta/W} || pi_ref), where guided_W = pi_ref^(1-W)·pi_theta^W is the
   sequence-level mix (what exact guided sampling converges to). Exact sums over every completion, no sampling.
2. Cost against quality: `rlfree sample` with soft best-of-N, energy-guided sampling (several M, K, block sizes) and
   guidance (W = 1 on the trained model, M candidates); for each, the TV between its picks and the exact pi*_beta,
   averaged over prompts, against the model-token passes each pick cost (`cost_model_tokens` in the sidecar). An exact
   draw of the same number of picks has TV "noise floor" > 0: that is the best any sampler can show here.

    python benchmarks/inference_control.py            # about 25 minutes on 2 CPU cores (soft best-of-64 is 4 of them)

Tokens/s of each sampler with the vLLM backend need a GPU and were not measured here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from rlfree import toy
from rlfree.demos import DemoConfig, run_demo
from rlfree.lm.loading import load_causal_lm, load_tokenizer
from rlfree.stages.sample import SampleConfig, sample

REWARD = "rlfree.toy:arithmetic_reward"


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def picks_tv(folder: Path, exact: dict, target: torch.Tensor) -> float:
    """Mean over prompts of TV(histogram of the picks, target)."""
    picked = load_from_disk(str(folder))
    tvs = []
    for p in range(target.shape[0]):
        rows = [exact["index"][tuple(r["completion_ids"])] for r in picked if r["prompt_index"] == p]
        counts = torch.bincount(torch.tensor(rows), minlength=target.shape[1]).double()
        tvs.append(total_variation(counts / counts.sum(), target[p]))
    return sum(tvs) / len(tvs)


def noise_floor(target: torch.Tensor, size: int, draws: int = 20) -> float:
    generator = torch.Generator().manual_seed(0)
    values = []
    for _ in range(draws):
        for p in range(target.shape[0]):
            counts = torch.bincount(torch.multinomial(target[p], size, True, generator=generator), minlength=target.shape[1])  # fmt: skip
            values.append(total_variation(counts.double() / size, target[p]))
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--num_picks", type=int, default=200, help="Picks per prompt of each sampler.")
    parser.add_argument("--num_prompts", type=int, default=4, help="Prompts sampled (of the 16 trained on).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inference-control-"))
    started = time.perf_counter()
    run_demo(DemoConfig(output_dir=str(work / "demo"), beta=args.beta))
    print(f"trained pi_theta at beta={args.beta} in {time.perf_counter() - started:.0f} s\n")

    demo = work / "demo"
    tokenizer = load_tokenizer(str(demo / "reference"))
    lines = (demo / "prompts.jsonl").read_text().splitlines()[: args.num_prompts]
    (work / "prompts.jsonl").write_text("".join(line + "\n" for line in lines))
    prompts = [json.loads(line)["prompt"] for line in lines]
    models = {name: load_causal_lm(str(demo / name), device=torch.device("cpu")) for name in ("reference", "model")}
    ref = toy.exact_distributions(models["reference"], tokenizer, prompts, 3)
    tuned = toy.exact_distributions(models["model"], tokenizer, prompts, 3)
    exact = {"index": {tuple(c): i for i, c in enumerate(ref["completions"])}}

    print("| W | beta/W | KL(pi*_{beta/W} ‖ guided_W) | KL(pi*_{beta/W} ‖ pi_ref) | ratio |")
    print("|---|---|---|---|---|")
    for scale in (0.5, 1.0, 1.5, 2.0, 3.0):
        target = toy.tilt(ref["logprobs"], ref["rewards"], args.beta / scale)
        guided = ((1 - scale) * ref["logprobs"] + scale * tuned["logprobs"]).log_softmax(-1)
        to_guided = toy.kl(target, guided).mean().item()
        to_ref = toy.kl(target, ref["logprobs"]).mean().item()
        print(f"| {scale} | {args.beta / scale:.3g} | {to_guided:.4f} | {to_ref:.4f} | {to_guided / to_ref:.1%} |")

    target = toy.tilt(ref["logprobs"], ref["rewards"], args.beta).exp()
    common = {"prompts": str(work / "prompts.jsonl"), "max_new_tokens": 3, "batch_size": 4096, "seed": 0}
    common |= {"num_picks": args.num_picks}
    rewarded = {"reward": [REWARD], "beta": args.beta, "model_name_or_path": str(demo / "reference")}
    runs = {
        **{f"soft best-of-{n}": rewarded | {"soft_best_of_n": n} for n in (4, 16, 64)},
        **{
            f"ETS B={b} M={m} K={k}": rewarded
            | {"energy_guided": True, "block_size": b, "num_candidates": m, "num_rollouts": k}
            for b, m, k in ((1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 4, 4))
        },
        **{
            f"guidance W=1 M={m}": {
                "model_name_or_path": str(demo / "model"),
                "ref_model": str(demo / "reference"),
                "guidance_scale": 1.0,
                "guidance_candidates": m,
            }
            for m in (1, 4)
        },
    }
    print(f"\nTV to pi*_beta of {args.num_picks} picks per prompt, mean over {len(prompts)} prompts")
    print(f"(exact draws of that size: TV {noise_floor(target, args.num_picks):.3f} on average, the floor)\n")
    print("| sampler | TV to pi* | model-token passes per pick | sequences per pick | reward calls per pick | s |")
    print("|---|---|---|---|---|---|")
    for name, settings in runs.items():
        output = work / name.replace(" ", "_").replace("=", "")
        started = time.perf_counter()
        sample(SampleConfig(output_dir=str(output), **common, **settings))
        seconds = time.perf_counter() - started
        cost = json.loads((output / "picked" / "sampling.json").read_text())["cost"]["per_pick"]
        tv = picks_tv(output / "picked", exact, target)
        print(
            f"| {name} | {tv:.3f} | {cost['model_tokens']:.0f} | {cost['sequences']:.0f} | "
            f"{cost['reward_calls']:.0f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
