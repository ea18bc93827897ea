"""Stage 1: sample N completions per prompt and record their exact log-probabilities.

`ref_logprob` is log pi_ref(o|q) from the model's full softmax at temperature 1, read in a teacher-forced pass over
the exact generated ids; `proposal_logprob` is log p(o|q) of the sampler actually used (temperature, top-k, top-p, the
engine's own numerics with `--backend vllm`, and with `--ref_model` another model altogether). The weighting stage
corrects for the difference, so sampling from any proposal still targets pi_ref.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset

from ..data import (
    check_output_dir,
    folder_stamp,
    load_prompts,
    nearest_existing,
    process_state,
    read_sidecars,
    run_in_shards,
)
from ..diffusion import is_pipeline
from ..diffusion.generation import generate_samples
from ..errors import StageInputError
from ..lm.backends import BackendModel, SamplingBackend, load_backend
from ..lm.generation import (
    check_same_tokens,
    engine_gap_warning,
    model_context,
    prepare_prompts,
    summarize_engine_gap,
    task_tokenizer,
    teacher_forced,
)
from ..lm.guidance import GuidedBackend
from ..lm.modeling import AdapterOff, eos_token_ids, load_causal_lm, load_reference, load_tokenizer
from ..options import (
    LoadOptions,
    PromptOptions,
    SamplerOptions,
    check_prompts,
    prompts_field,
    required_output_dir_field,
)
from ..sources import content_fingerprint


@dataclass
class GenerateConfig(SamplerOptions, PromptOptions, LoadOptions):
    """Settings of `rlfree generate`."""

    model_name_or_path: str = field(
        metadata={"help": "Model sampled from, a local folder or a Hub id: pi_ref itself unless --ref_model is set."}
    )
    prompts: str | None = prompts_field(optional=True)
    output_dir: str = required_output_dir_field("Where the generated dataset is written (save_to_disk layout).")
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "Reference model pi_ref when sampling from another model; --model_name_or_path is then the "
            "proposal and needs the same tokenizer (a PEFT adapter on this very reference shares its weights: the "
            "adapter off is pi_ref). Default: the sampled model is pi_ref."
        },
    )
    num_samples: int = field(default=8, metadata={"help": "Completions sampled per prompt (N)."})
    guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Sample the token-level mix softmax((1-w)·log pi_ref + w·log pi_theta) of --ref_model and "
            "--model_name_or_path (pi_theta) at this scale w >= 0, recording log pi_theta as model_logprob "
            "(hf backend). `rlfree sample --guidance_scale` picks among such samples to reach the sequence-level mix. "
            "Diffusion pipelines: with --ref_model, RLG's step-by-step mix ref + w·(model - ref); without it, a "
            "text-to-image pipeline's classifier-free guidance scale."
        },
    )
    shard_size: int = field(
        default=64,
        metadata={
            "help": "Prompts per shard (samples per shard for a diffusion pipeline): the unit written at once, split "
            "across processes and resumed."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_prompts(self)
        if self.num_samples < 1:
            raise StageInputError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise StageInputError(f"--shard_size must be >= 1, got {self.shard_size}")
        if self.guidance_scale is not None:
            if is_pipeline(self.model_name_or_path):  # RLG's W or a text-to-image pipeline's CFG scale
                check_guidance_scale(self.guidance_scale)
            else:
                check_guidance(self.guidance_scale, self.ref_model, self.backend)


def check_guidance_scale(scale: float, meaning: str = "") -> None:
    if not scale >= 0 or math.isinf(scale):
        raise StageInputError(f"--guidance_scale must be finite and >= 0{meaning}, got {scale}")


def check_guidance(scale: float, ref_model: str | None, backend: str) -> None:
    """Guidance needs a scale w >= 0, the reference model, and the HF backend (the engine cannot mix two models)."""
    check_guidance_scale(scale, " (0 = pi_ref, 1 = the tuned model, > 1 extrapolates)")
    if ref_model is None:
        raise StageInputError("--guidance_scale mixes two models: give the reference model with --ref_model")
    if backend != "hf":
        raise StageInputError(
            f"--guidance_scale runs on --backend hf only (got {backend}): vLLM cannot mix two models' logits per token"
        )


# What one generated row costs, measured on the toy (1.8 KB in memory with 3 new tokens and a 4-token prompt): Python
# objects while its shard is built, then Arrow. A shard is built in memory and written at once.
ROW_BYTES_IN_MEMORY, TOKEN_BYTES_IN_MEMORY = 2048, 64
ROW_BYTES_ON_DISK, TOKEN_BYTES_ON_DISK = 256, 16


def check_size(config: GenerateConfig, prompt_ids: list[list[int]], sampled: list[int]) -> None:
    """Refuse, before sampling, a stage whose shards cannot be held in memory or whose dataset cannot fit on disk.

    A shard holds all N samples of each of its prompts, so `--num_samples` alone can exceed the machine (a billion
    samples of 4 prompts filled 22 GB in two minutes before it was killed). Estimates are rough: half the machine's
    memory per shard, the dataset twice on disk (its shards, then the finished folder).
    """
    tokens = config.max_new_tokens + max((len(prompt_ids[index]) for index in sampled), default=0)
    per_prompt = config.num_samples * (ROW_BYTES_IN_MEMORY + TOKEN_BYTES_IN_MEMORY * tokens)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    prompts_per_shard = min(config.shard_size, len(sampled))
    if per_prompt > memory / 2:
        raise StageInputError(
            f"--num_samples {config.num_samples}: the samples of one prompt take about {per_prompt / 2**30:.0f} GB in "
            f"memory while they are written, more than half of this machine's {memory / 2**30:.0f} GB; lower "
            "--num_samples"
        )
    if prompts_per_shard * per_prompt > memory / 2:
        raise StageInputError(
            f"--shard_size {config.shard_size}: a shard of {prompts_per_shard} prompts x {config.num_samples} samples "
            f"takes about {prompts_per_shard * per_prompt / 2**30:.0f} GB in memory, more than half of this machine's "
            f"{memory / 2**30:.0f} GB; use --shard_size {max(1, int(memory / 2 // per_prompt))} or less"
        )
    on_disk = 2 * len(sampled) * config.num_samples * (ROW_BYTES_ON_DISK + TOKEN_BYTES_ON_DISK * tokens)
    folder = nearest_existing(Path(config.output_dir).expanduser().resolve().parent)
    free = shutil.disk_usage(folder).free
    if on_disk > free:
        raise StageInputError(
            f"--num_samples {config.num_samples}: {len(sampled)} prompts x {config.num_samples} samples need about "
            f"{on_disk / 2**30:.1f} GB of disk (the shards, then the dataset), and {folder} has {free / 2**30:.1f} GB "
            "free; lower --num_samples or --max_new_tokens, or write elsewhere"
        )


def check_output(config: GenerateConfig) -> None:
    """Refuse an --output_dir that generating would destroy (`check_output_dir`), before anything is made."""
    inputs = {"--model_name_or_path": config.model_name_or_path, "--ref_model": config.ref_model}
    check_output_dir(config.output_dir, "generation", asdict(config), inputs | {"--prompts": config.prompts})


def generate(config: GenerateConfig) -> Dataset:
    """Run the generation stage: shard by shard, across `accelerate launch` processes, resuming an interrupted run.

    Every sample's randomness comes from (seed, prompt index, sample index), so the dataset is the same whatever the
    batch size, the shard size or the number of processes, and a resumed run equals an uninterrupted one.
    """
    check_output(config)
    if is_pipeline(config.model_name_or_path):
        return generate_samples(config)
    state = process_state()
    prompt_rows = load_prompts(config.prompts, config.prompts_split)
    paths = {"--model_name_or_path": config.model_name_or_path, "--ref_model": config.ref_model}
    context = model_context(paths, config.trust_remote_code)
    # pi_ref defines the task: its tokenizer (and chat template) renders the prompts.
    tokenizer_source = config.ref_model or config.model_name_or_path
    tokenizer = task_tokenizer(tokenizer_source, config.trust_remote_code)
    prompts = prepare_prompts(prompt_rows, tokenizer, config, context, state.is_main_process)
    texts, prompt_ids, sampled, extras = prompts.texts, prompts.prompt_ids, prompts.sampled, prompts.extras
    check_size(config, prompt_ids, sampled)

    stamps = {"model_stamp": folder_stamp(config.model_name_or_path)}
    if config.ref_model is not None:
        stamps["ref_model_stamp"] = folder_stamp(config.ref_model)
    settings = asdict(config) | {"num_prompts": len(texts), "prompts_fingerprint": content_fingerprint(config.prompts)}
    settings |= stamps

    @functools.cache
    def models() -> tuple:
        """Loaded on the first shard this process writes: a finished run loads nothing."""
        model = load_causal_lm(config.model_name_or_path, config.dtype, config.trust_remote_code, state.device)
        if config.ref_model is None:
            return model, None
        ref_model = load_reference(
            config.ref_model, model, config.model_name_or_path, config.dtype, config.trust_remote_code, state.device
        )
        if not isinstance(ref_model, AdapterOff):
            proposal_tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
            check_same_tokens(
                config.model_name_or_path, model, proposal_tokenizer, config.ref_model, ref_model, tokenizer
            )
        return model, ref_model

    @functools.cache
    def backend() -> SamplingBackend:
        """The engine, started on the first shard this process writes and closed when the stage ends."""
        model = BackendModel(config.model_name_or_path, config.dtype, config.trust_remote_code, lambda: models()[0])
        eos = eos_token_ids(models()[0], tokenizer)
        if config.guidance_scale is not None:
            return GuidedBackend(model, config, eos, models()[1], config.guidance_scale)
        return load_backend(model, config, eos)

    def make_shard(positions: range) -> Dataset:
        model, ref_model = models()
        shard_prompts = {sampled[position]: prompt_ids[sampled[position]] for position in positions}
        draws = backend().draw(shard_prompts, config.num_samples, config.seed)
        rows = []
        guided = config.guidance_scale is not None
        for sample in teacher_forced(draws, shard_prompts, model, ref_model, config, tokenizer.pad_token_id, guided):
            index = sample["prompt_index"]
            rows.append(
                {
                    "prompt": texts[index],
                    "prompt_index": index,
                    "sample_index": sample["sample_index"],
                    "completion": tokenizer.decode(sample["completion_ids"], skip_special_tokens=True),
                    "prompt_ids": prompt_ids[index],
                    **sample,
                    **extras[index],
                }
            )
        return Dataset.from_list(rows)

    try:
        dataset = run_in_shards(
            config.output_dir,
            "generation",
            settings,
            len(sampled),
            config.shard_size,
            make_shard,
            finish=summarize_engine_gap,
        )
    finally:
        if backend.cache_info().currsize:
            backend().close()
    warning = engine_gap_warning(read_sidecars(config.output_dir)["generation"]) if state.is_main_process else None
    if warning:
        print(f"warning: {warning}")
    return dataset


def generate_command(config: GenerateConfig) -> str:
    return f"wrote {len(generate(config))} completions to {config.output_dir}"
