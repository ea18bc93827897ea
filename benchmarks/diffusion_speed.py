"""Images per second of diffusion `generate` and `train`, with and without LoRA, against their diffusers peers measured
in the same run: the pipeline's own `__call__` for sampling, and a plain diffusers-style training loop (noise,
`add_noise`, MSE, step: what diffusers' train_unconditional.py does per batch) for training.

The model is the digits demo's UNet (1×8×8, unconditional here so that `DDPMPipeline` itself can be the peer; random
weights: speed does not depend on them) or, with --model text, the tiny StableDiffusionPipeline of the tests (4×8×8
latents, 3×16×16 images, no classifier-free guidance). Runs on CUDA when
present, else on the CPU; one process, so run it alone.

    python benchmarks/diffusion_speed.py [--model digits|text] [--batch_size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlfree.diffusion import toy
from rlfree.diffusion.lora import add_lora
from rlfree.diffusion.pipeline import denoise, load_pipeline, to_images, unet_condition
from rlfree.diffusion.trainer import DiffusionTrainer
from rlfree.training import RLFreeConfig


def build(model: str, folder: Path) -> None:
    if model == "text":
        toy.build_text_pipeline(folder)
    else:
        toy.build_pipeline(folder, sample_size=8)


def condition_for(pipeline, count: int) -> dict:
    return unet_condition(pipeline, prompts=["a bright square"] * count)


def best_of(repeats: int, run) -> float:
    """The fastest of `repeats` timed runs (after one warm-up), in seconds."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def generation(pipeline, args) -> tuple[float, float]:
    """(rlfree's images/s, the pipeline's own images/s) for one batch of `batch_size` at `steps` steps."""
    count, steps = args.batch_size, args.inference_steps
    seeds = list(range(count))

    def ours():
        samples = denoise(pipeline.unet, pipeline.scheduler, seeds, condition_for(pipeline, count), steps)
        to_images(samples, getattr(pipeline, "vae", None))

    def theirs():
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        settings = {"generator": generators, "num_inference_steps": steps, "output_type": "np"}
        if getattr(pipeline, "text_encoder", None) is not None:
            pipeline(["a bright square"] * count, guidance_scale=1.0, **settings)
        else:
            pipeline(batch_size=count, **settings)

    pipeline.set_progress_bar_config(disable=True)
    return count / best_of(args.repeats, ours), count / best_of(args.repeats, theirs)


def training(pipeline, args, lora: bool, root: Path) -> tuple[float, float]:
    """(rlfree's images/s, a plain loop's images/s) over `train_steps` steps of batch `batch_size`."""
    from datasets import Array3D, Dataset, Features, Value

    count = args.batch_size
    shape = pipeline.unet.config.in_channels, *([pipeline.unet.config.sample_size] * 2)
    samples = torch.randn(count, *shape)
    rows = {"sample": samples.numpy(), "weight": [1.0 / count] * count, "prompt_index": [0] * count}
    rows["prompt"] = ["a bright square"] * count
    # Typed as `rlfree generate` writes them: samples as fixed-shape arrays, read back as numpy without copies per pixel.
    types = {"sample": Array3D(tuple(shape), "float32"), "weight": Value("float64"), "prompt_index": Value("int64")}
    data = Dataset.from_dict(rows, features=Features(types | {"prompt": Value("string")}))
    unet = add_lora(pipeline.unet, 16, 32, 0.0, ["all-linear"]) if lora else pipeline.unet
    config = RLFreeConfig(
        output_dir=str(root / "train"), dataset_dir=str(root), max_steps=args.train_steps, report_to=[],
        per_device_train_batch_size=count, save_strategy="no", disable_tqdm=True, logging_steps=10**6,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DiffusionTrainer(pipeline, config, data, "base", unet, "LoRA" if lora else "")
    ours = best_of(args.repeats, trainer.train)

    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    device = trainer.args.device
    condition = condition_for(pipeline, count)

    def plain():
        for _ in range(args.train_steps):
            batch = samples.to(device)
            noise = torch.randn_like(batch)
            steps = torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (count,), device=device)
            prediction = unet(pipeline.scheduler.add_noise(batch, noise, steps), steps, **condition).sample
            loss = torch.nn.functional.mse_loss(prediction, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    theirs = best_of(args.repeats, plain)
    if lora:
        pipeline.unet = unet.unload()
    images = count * args.train_steps
    return images / ours, images / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "text"), default="digits")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument(
        "--train_steps", type=int, default=100, help="Steps per timed run (the Trainer's set-up is in it)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="diffusion-speed-"))
    build(args.model, root / "pipeline")
    pipeline = load_pipeline(str(root / "pipeline"))
    device = pipeline.unet.device
    print(f"{args.model} pipeline on {device}, batch {args.batch_size}; images/s, best of {args.repeats}")
    ours, theirs = generation(pipeline, args)
    print("| stage | rlfree | peer | ratio |\n|---|---|---|---|")
    print(f"| generate ({args.inference_steps} steps) | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    for lora in (False, True):
        pipeline.unet.train()
        ours, theirs = training(pipeline, args, lora, root)
        print(f"| train{' (LoRA r=16)' if lora else ''} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
