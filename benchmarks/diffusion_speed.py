"""Images per second of diffusion `generate` and `train`, with and without LoRA, against their diffusers peers measured
in the same run: the pipeline's own `__call__` for sampling, and a bare diffusers-style training loop for training
(what diffusers' training scripts do per batch, with the prompt embeddings computed once: noise, a time, the noised
sample, one pass, MSE against the target, an AdamW step; `add_noise` and the noise target for a UNet, the
rectified-flow interpolation and the velocity target for SD3 and Flux).

Models (random weights: speed does not depend on them):
    digits  the digits demo's UNet (1×8×8, unconditional, so that `DDPMPipeline` itself can be the peer)
    sd, sdxl, sd3, flux  the tiny pipelines of the tests (`rlfree.diffusion.tiny`: 4×8×8 latents, 3×16×16 images)
No classifier-free guidance. Runs on CUDA when present (with --dtype bfloat16 there), else on the CPU; one process,
so run it alone.

    python benchmarks/diffusion_speed.py [--model digits|sd|sdxl|sd3|flux] [--batch_size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlfree.diffusion import tiny, toy
from rlfree.diffusion.layouts import read_layout
from rlfree.diffusion.lora import add_lora
from rlfree.diffusion.pipeline import denoise, is_flow_matching, load_pipeline, noise_scheduler
from rlfree.diffusion.trainer import DiffusionTrainer
from rlfree.training import RLFreeConfig

PROMPT = "a bright square"


def build(model: str, folder: Path) -> None:
    if model == "digits":
        toy.build_pipeline(folder, sample_size=8)
    else:
        tiny.build(model, folder)


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


def generation(pipeline, layout, args) -> tuple[float, float]:
    """(rlfree's images/s, the pipeline's own images/s) for one batch of `batch_size` at `steps` steps."""
    count, steps = args.batch_size, args.inference_steps
    seeds = list(range(count))
    resolution = None if args.model == "digits" else tiny.RESOLUTION
    shape = layout.sample_shape(resolution)
    device = layout.network(pipeline).device

    def ours():
        condition = layout.condition(pipeline, [PROMPT] * count, None, device) if layout.conditioning == "text" else {}
        samples = denoise(layout.network(pipeline), pipeline.scheduler, seeds, condition, steps, layout=layout, shape=shape)  # fmt: skip
        layout.decode(pipeline, samples)

    def theirs():
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        settings = {"generator": generators, "num_inference_steps": steps, "output_type": "np"}
        if layout.conditioning == "text":
            size = {"height": resolution, "width": resolution}
            guidance = {} if args.model == "flux" else {"guidance_scale": 1.0}  # Flux: its embedded guidance only
            pipeline([PROMPT] * count, **size, **guidance, **settings)
        else:
            pipeline(batch_size=count, **settings)

    pipeline.set_progress_bar_config(disable=True)
    return count / best_of(args.repeats, ours), count / best_of(args.repeats, theirs)


def training(pipeline, layout, args, lora: bool, root: Path) -> tuple[float, float]:
    """(rlfree's images/s, a bare loop's images/s) over `train_steps` steps of batch `batch_size`."""
    from datasets import Array3D, Dataset, Features, Value

    count = args.batch_size
    shape = layout.sample_shape(None if args.model == "digits" else tiny.RESOLUTION)
    samples = torch.randn(count, *shape)
    rows = {"sample": samples.numpy(), "weight": [1.0 / count] * count, "prompt_index": [0] * count}
    rows["prompt"] = [PROMPT] * count
    # Typed as `rlfree generate` writes them: samples as fixed-shape arrays, read back as numpy without copies per pixel.
    types = {"sample": Array3D(tuple(shape), "float32"), "weight": Value("float64"), "prompt_index": Value("int64")}
    data = Dataset.from_dict(rows, features=Features(types | {"prompt": Value("string")}))
    own = layout.network(pipeline)
    network = add_lora(own, 16, 32, 0.0, ["all-linear"], layout) if lora else own
    config = RLFreeConfig(
        output_dir=str(root / "train"), dataset_dir=str(root), max_steps=args.train_steps, report_to=[],
        per_device_train_batch_size=count, save_strategy="no", disable_tqdm=True, logging_steps=10**6,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DiffusionTrainer(pipeline, config, data, "base", network, "LoRA" if lora else "", layout=layout)
    ours = best_of(args.repeats, trainer.train)

    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    device = trainer.args.device
    scheduler = noise_scheduler(pipeline.scheduler)
    flow = is_flow_matching(scheduler)
    steps = scheduler.config.num_train_timesteps
    condition = layout.condition(pipeline, [PROMPT] * count, None, device) if layout.conditioning == "text" else {}

    def bare():
        for _ in range(args.train_steps):
            batch = samples.to(device)
            noise = torch.randn_like(batch)
            index = torch.randint(0, steps, (count,))
            if flow:
                sigma = scheduler.sigmas[index].to(device).view(-1, 1, 1, 1)
                noisy, target = (1 - sigma) * batch + sigma * noise, noise - batch
                timesteps = scheduler.timesteps[index].to(device)
            else:
                timesteps = index.to(device)
                noisy, target = scheduler.add_noise(batch, noise, timesteps), noise
            prediction = layout.predict(network, noisy, timesteps, condition)
            loss = torch.nn.functional.mse_loss(prediction, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    theirs = best_of(args.repeats, bare)
    if lora:
        pipeline.register_modules(**{layout.denoiser: network.unload()})
    images = count * args.train_steps
    return images / ours, images / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", *tiny.BUILDERS), default="digits")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument(
        "--train_steps", type=int, default=100, help="Steps per timed run (the Trainer's set-up is in it)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16, float16 or float32.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="diffusion-speed-"))
    build(args.model, root / "pipeline")
    layout = read_layout(str(root / "pipeline"))
    pipeline = load_pipeline(str(root / "pipeline"), args.dtype)
    device = layout.network(pipeline).device
    print(f"{args.model} pipeline on {device}, batch {args.batch_size}; images/s, best of {args.repeats}")
    ours, theirs = generation(pipeline, layout, args)
    print("| stage | rlfree | peer | ratio |\n|---|---|---|---|")
    print(f"| generate ({args.inference_steps} steps) | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    for lora in (False, True):
        layout.network(pipeline).train()
        ours, theirs = training(pipeline, layout, args, lora, root)
        print(f"| train{' (LoRA r=16)' if lora else ''} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
        if torch.cuda.is_available():
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
