"""`rlfree generate` on a diffusers pipeline: N seeded samples per condition, stored as the model made them.

Each row holds `sample` (the model-space tensor, [C, H, W], what the trainer denoises) and `completion` (the image,
[H, W, C] floats in [0, 1], as `pipeline(output_type="np")` gives it: what reward functions see). The sampler is the
base pipeline itself, so the weights need no proposal correction and the rows carry no log-probabilities (a
diffusion model's exact likelihood is not available). `grids/` holds a PNG grid per condition to look at.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, Dataset, Features, Value

from ..adapters import AdapterOff
from ..data import load_prompts, process_state, run_in_shards
from ..errors import StageInputError
from ..options import GenerationSettings
from ..seeds import sample_seed
from .layouts import Layout, read_layout
from .lora import shares_base, with_adapter
from .pipeline import denoise, load_pipeline

# Flags of `generate` that only mean something for language models, with the value that leaves them off.
LM_ONLY = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "backend": "hf",
}


def check_diffusion_flags(config: GenerationSettings, layout: Layout) -> None:
    set_flags = [f"--{name}" for name, off in LM_ONLY.items() if getattr(config, name) != off]
    if set_flags:
        raise StageInputError(
            f"{', '.join(set_flags)}: not available for a diffusion pipeline ({config.model_name_or_path}); the "
            "samples come from the pipeline's own scheduler with --num_inference_steps"
        )
    if config.ref_model is not None and config.guidance_scale is None:
        raise StageInputError(
            f"--ref_model {config.ref_model} without --guidance_scale: a diffusion pipeline is sampled as it is (its "
            "samples carry no log-probabilities to correct); --guidance_scale W mixes it with --ref_model (RLG)"
        )
    if config.ref_model is None and config.guidance_scale is not None and config.cfg_guidance_scale is not None:
        raise StageInputError(
            "--guidance_scale and --cfg_guidance_scale: without --ref_model both are the classifier-free guidance "
            "scale; give one"
        )
    if cfg_scale(config) is not None and layout.conditioning != "text":
        raise StageInputError(
            f"classifier-free guidance (--cfg_guidance_scale, or --guidance_scale without --ref_model) is for "
            f"text-to-image pipelines; {config.model_name_or_path} has no text encoder (with --ref_model, "
            "--guidance_scale is RLG's W)"
        )
    if config.resolution is not None:
        layout.check_resolution(config.resolution, config.model_name_or_path)
    if config.ref_model is not None and read_layout(config.ref_model).architecture != layout.architecture:
        raise StageInputError(
            f"--ref_model {config.ref_model} and --model_name_or_path {config.model_name_or_path} have different "
            f"{layout.denoiser} architectures: guidance mixes their predictions step by step, so one must be "
            "fine-tuned from the other"
        )


def cfg_scale(config: GenerationSettings) -> float | None:
    """The classifier-free guidance scale: --cfg_guidance_scale, or --guidance_scale where it is not RLG's W."""
    if config.cfg_guidance_scale is not None or config.ref_model is not None:
        return config.cfg_guidance_scale
    return config.guidance_scale


def conditions(config: GenerationSettings, layout: Layout) -> list[dict]:
    """One row per condition: {prompt, class_label?, extra columns}. An unconditional pipeline has one, with no text;
    a text-to-image pipeline's prompts are plain text (chat `messages` mean nothing to its text encoder)."""
    if layout.conditioning == "text":
        if config.prompts is None:
            raise StageInputError(f"{config.model_name_or_path} is a text-to-image pipeline: give --prompts")
        rows = list(load_prompts(config.prompts, config.prompts_split))
        if any(not isinstance(row.get("prompt"), str) for row in rows):
            raise StageInputError(
                f"--prompts {config.prompts}: a text-to-image pipeline takes a `prompt` column of plain text"
            )
        return rows
    classes = layout.num_classes
    if classes is None:
        if config.prompts is not None:
            raise StageInputError(
                f"--prompts {config.prompts}: {config.model_name_or_path} is an unconditional pipeline, it takes no "
                "prompts; drop --prompts (its N samples form one group)"
            )
        return [{"prompt": ""}]
    if config.prompts is None:
        raise StageInputError(
            f"{config.model_name_or_path} is class-conditional ({classes} classes): give --prompts, a file whose "
            f"`prompt` column holds class labels (0..{classes - 1})"
        )
    rows = list(load_prompts(config.prompts, config.prompts_split))
    for row_number, row in enumerate(rows):
        text = row["prompt"].strip()
        if not text.isdigit() or int(text) >= classes:
            raise StageInputError(
                f"--prompts {config.prompts}: row {row_number}'s prompt {row['prompt']!r} is not a class label of "
                f"{config.model_name_or_path} (an integer in 0..{classes - 1})"
            )
        row["class_label"] = int(text)
    return rows


def features(rows: list[dict], sample: tuple[int, ...], image: tuple[int, ...]) -> Features:
    """The types of the stage's own columns; the prompts' extra columns keep the types `datasets` infers."""
    types = {
        "prompt": Value("string"),
        "prompt_index": Value("int64"),
        "sample_index": Value("int64"),
        "completion": Array3D(image, "float32"),
        "sample": Array3D(sample, "float32"),
    }
    if "class_label" in rows[0]:
        types["class_label"] = Value("int64")
    return Features(types)


def generate_samples(config: GenerationSettings, settings: dict) -> Dataset:
    """The generation stage for a pipeline: shards of `--shard_size` samples, resumed after an interrupt; `settings` is
    what the stage records about the run."""
    path = config.model_name_or_path
    layout = read_layout(path)
    check_diffusion_flags(config, layout)
    state = process_state()
    rows = conditions(config, layout)
    settings = settings | {"num_prompts": len(rows)}
    rlg_scale = config.guidance_scale if config.ref_model is not None else 1.0
    guidance = cfg_scale(config)
    # RLG between a LoRA output and the base its adapter sits on: one denoiser, the adapter on and off.
    one_network = shares_base(path, config.ref_model, layout)
    shape = layout.sample_shape(config.resolution)

    @functools.cache
    def pipeline():  # the scheduler, and the text encoders and VAE of a text-to-image pipeline
        return load_pipeline(config.ref_model if one_network else path, config.dtype, state.device)

    @functools.cache
    def network():
        own = layout.network(pipeline())
        return with_adapter(own, path, layout) if one_network else own

    @functools.cache
    def ref_network():
        if one_network:
            return AdapterOff(network())
        if config.ref_model is None:
            return None
        return layout.network(load_pipeline(config.ref_model, config.dtype, state.device))

    def make_shard(positions: range) -> Dataset:
        shard = [divmod(position, config.num_samples) for position in positions]  # (prompt, sample)
        columns: dict[str, list] = {}
        for start in range(0, len(shard), config.batch_size):
            batch = shard[start : start + config.batch_size]
            labels = torch.tensor([rows[p]["class_label"] for p, _ in batch]) if layout.num_classes else None
            prompts = [rows[p]["prompt"] for p, _ in batch]
            condition = layout.condition(pipeline(), prompts, labels, state.device)
            null_condition = (
                None if guidance is None else layout.null_condition(pipeline(), len(batch), None, state.device)
            )
            seeds = [sample_seed(config.seed, p, s) for p, s in batch]
            samples = denoise(
                network(), pipeline().scheduler, seeds, condition, config.num_inference_steps, ref_network(),
                rlg_scale, null_condition, guidance or 1.0, layout, shape,
            )  # fmt: skip
            images = layout.decode(pipeline(), samples)
            for (p, s), sample, image in zip(batch, samples.float().cpu().numpy(), images, strict=True):
                row = rows[p] | {"prompt_index": p, "sample_index": s, "completion": image, "sample": sample}
                for name, value in row.items():
                    columns.setdefault(name, []).append(value)
        types = features(rows, shape, columns["completion"][0].shape)
        dataset = Dataset.from_dict({name: columns[name] for name in types}, features=types)
        for name in columns.keys() - types.keys():
            dataset = dataset.add_column(name, columns[name])
        return dataset

    total = len(rows) * config.num_samples
    dataset = run_in_shards(config.output_dir, "generation", settings, total, config.shard_size, make_shard)
    if state.is_main_process:
        save_grids(dataset, Path(config.output_dir) / "grids")
    return dataset


def save_grids(dataset: Dataset, folder: Path, columns: int = 8) -> None:
    """One PNG per condition, its samples in rows of `columns` (what a person looks at; the data is the dataset)."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    table = dataset.select_columns(["prompt_index", "completion"]).with_format("numpy")[:]
    prompt_index = table["prompt_index"]
    images = table["completion"]
    for prompt in np.unique(prompt_index):
        group = images[prompt_index == prompt]
        count, height, width, channels = group.shape
        rows = math.ceil(count / columns)
        grid = np.ones((rows * (height + 1) + 1, min(count, columns) * (width + 1) + 1, channels), np.float32)
        for position, image in enumerate(group):
            top, left = 1 + (position // columns) * (height + 1), 1 + (position % columns) * (width + 1)
            grid[top : top + height, left : left + width] = image
        pixels = (grid * 255).round().astype(np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"prompt-{prompt}.png")
