"""Option groups several commands share, composed into each command's config by inheritance (never copied).

`HfArgumentParser` turns every field into a flag, so a command's config is its own fields plus the groups it
inherits: `class GenerationSettings(SamplerOptions, PromptOptions, LoadOptions)`. Each group validates its own fields in
`__post_init__`; a config that overrides `__post_init__` calls `super().__post_init__()`. The groups are keyword-only,
so a command's own fields (a plain dataclass) stay positional, in their order, ahead of them:
`GenerateConfig("model", "prompts.jsonl", "out")` still works. What a command's positional fields mean differs per
command (the model sampled, evaluated or trained), so each declares them, with the shared help from `*_field()`.

Nothing here knows a model family: a check that depends on the family is the family's (`rlfree.family`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import DTYPES, StageInputError, check_choice, check_finite

LONG_PROMPTS = ("error", "skip", "truncate")
# The sampling engines of causal LMs (`rlfree.lm.backends`), named here so that the flag's choices and the loader read
# one table; "module:Class", imported on use.
BACKENDS = {"hf": "rlfree.lm.backends.hf:HFBackend", "vllm": "rlfree.lm.backends.vllm:VLLMBackend"}


@dataclass(kw_only=True)
class Options:
    """Base of every option group: the checks that apply to all fields (finite floats)."""

    def __post_init__(self):
        check_finite(self)


def options_of(group: type, config: Any) -> dict[str, Any]:
    """The values of `group`'s fields in `config`, to hand them on to another command's config."""
    return {item.name: getattr(config, item.name) for item in fields(group)}


@dataclass(kw_only=True)
class LoadOptions(Options):
    """How models are loaded."""

    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})

    def __post_init__(self):
        super().__post_init__()
        check_choice("--dtype", self.dtype, DTYPES)


def prompts_field(optional: bool = False) -> Any:
    """The `--prompts` flag of every command that samples (optional where an unconditional model takes none)."""
    help = "JSONL/JSON/Parquet/CSV file, save_to_disk folder or Hub id with a 'prompt' or 'messages' column."
    if optional:
        return field(default=None, metadata={"help": help + " Not for an unconditional diffusion pipeline."})
    return field(metadata={"help": help})


def required_output_dir_field(help: str) -> Any:
    """--output_dir after an optional --prompts: a dataclass field with a default, required by `require_output_dir`."""
    return field(default=None, metadata={"help": f"{help} Required."})


def require_output_dir(config: Any) -> None:
    if config.output_dir is None:
        raise StageInputError("--output_dir is required")


@dataclass(kw_only=True)
class PromptOptions(Options):
    """How the prompt set is read."""

    prompts_split: str = field(default="train", metadata={"help": "Split to read when --prompts is a Hub dataset."})


@dataclass(kw_only=True)
class SamplerOptions(Options):
    """How completions are drawn: the sampler's settings and the backend that runs it."""

    max_new_tokens: int = field(
        default=256, metadata={"help": "Longest completion; longer ones are cut (finish_reason='length')."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; != 1 is corrected for in the weights."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; < 1 is corrected for in the weights."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off); corrected for in the weights."})
    batch_size: int = field(
        default=64, metadata={"help": "Sequences generated (or scored) per batch (does not change the samples)."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the sampler: each sample's randomness comes from (seed, prompt, sample index)."},
    )
    num_inference_steps: int = field(
        default=50, metadata={"help": "Diffusion pipelines: denoising steps of the pipeline's scheduler."}
    )
    resolution: int | None = field(
        default=None,
        metadata={"help": "Diffusion pipelines: image height and width in pixels (default: the pipeline's own)."},
    )
    cfg_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Text-to-image pipelines: classifier-free guidance scale (diffusers' guidance_scale; the empty "
            "prompt as negative); beside --ref_model it guides both of RLG's predictions, as RLG's own code does."
        },
    )
    long_prompts: str = field(
        default="error",
        metadata={
            "help": "A prompt that leaves the model's context no room for --max_new_tokens: stop with an error "
            "naming it (error), leave it out (skip), or keep its last tokens (truncate).",
            "choices": LONG_PROMPTS,
        },
    )
    teacher_forced_logprobs: bool = field(
        default=False,
        metadata={
            "help": "Read every log-probability from a teacher-forced pass, also where the HF backend's sampling pass "
            "already computed the model's own (temperature 1, no top-k/top-p, float32): the two agree to KV-cache "
            "rounding, and reusing the sampling pass's skips most of the teacher-forced work."
        },
    )
    backend: str = field(
        default="hf",
        metadata={
            "help": "Sampling engine: hf (transformers generate) or vllm (pip install -e '.[vllm]'). One seed gives "
            "the same samples within a backend, not across backends.",
            "choices": tuple(BACKENDS),
        },
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs each engine is split across."})
    vllm_gpu_memory_utilization: float = field(
        default=0.5,
        metadata={"help": "vLLM: share of GPU memory the engine may take (the rest serves the teacher-forced pass)."},
    )
    vllm_max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM: longest prompt + completion (default: the model's context)."}
    )
    vllm_enable_prefix_caching: bool = field(
        default=True, metadata={"help": "vLLM: share the KV cache of a prompt across its N samples."}
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={"help": "vLLM: skip torch.compile and CUDA graphs (starts in a third of the time; slower on GPU)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("--long_prompts", self.long_prompts, LONG_PROMPTS)
        check_choice("--backend", self.backend, tuple(BACKENDS))
        if self.max_new_tokens < 1:
            raise StageInputError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise StageInputError(f"--temperature must be > 0 (use a small value, not 0), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise StageInputError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise StageInputError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.batch_size < 1:
            raise StageInputError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.num_inference_steps < 1:
            raise StageInputError(f"--num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.resolution is not None and self.resolution < 1:
            raise StageInputError(f"--resolution must be >= 1 (pixels), got {self.resolution}")
        if self.cfg_guidance_scale is not None and self.cfg_guidance_scale < 0:
            raise StageInputError(
                f"--cfg_guidance_scale must be >= 0 (1 = the conditional model), got {self.cfg_guidance_scale}"
            )
        if self.vllm_tensor_parallel_size < 1:
            raise StageInputError(f"--vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise StageInputError(
                f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}"
            )
        if self.vllm_max_model_len is not None and self.vllm_max_model_len <= self.max_new_tokens:
            raise StageInputError(
                f"--vllm_max_model_len {self.vllm_max_model_len} leaves no room for a prompt beside "
                f"--max_new_tokens {self.max_new_tokens}"
            )

    @property
    def is_plain(self) -> bool:
        """Sampling from the model's own softmax: no temperature, top-k or top-p."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def reward_functions_field() -> Any:
    """The `--reward` flag, also on its own in commands that take no reward model (the RLOO baseline)."""
    return field(
        default_factory=list,
        metadata={"help": "Reward function(s) as path/to/file.py:FUNC or package.module:FUNC (TRL signature)."},
    )


def split_reward_spec(spec: str) -> tuple[str, str]:
    """(file or module, function name) of `path/to/file.py:FUNC` or `package.module:FUNC`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise StageInputError(f"--reward {spec!r}: expected path/to/file.py:FUNC or package.module:FUNC")
    return target, name


@dataclass(kw_only=True)
class RewardOptions(Options):
    """The reward: functions with TRL's signature and/or reward models, summed with weights.

    Checked when the flags are parsed, before anything is made: at least one reward, each --reward well formed, one
    weight per reward.
    """

    reward: list[str] = reward_functions_field()
    reward_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward model(s), local folder or Hub id: sequence classification (logit 0) for text; for a "
            "diffusion pipeline's images a CLIP model (logit_scale·cos(prompt, image), as PickScore) or an image "
            "classifier (logit 0), with its image processor saved beside it."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the rewards in the sum, in order: --reward ones, then --reward_model ones."},
    )

    @property
    def reward_required(self) -> bool:
        """False in a command mode that uses no reward (guided sampling)."""
        return True

    def __post_init__(self):
        super().__post_init__()
        if self.reward_required and not self.reward and not self.reward_model:
            raise StageInputError("give at least one --reward path/to/file.py:FUNC or --reward_model PATH")
        for spec in self.reward:
            split_reward_spec(spec)
        count = len(self.reward) + len(self.reward_model)
        if self.reward_weights is not None and len(self.reward_weights) != count:
            raise StageInputError(f"--reward_weights has {len(self.reward_weights)} values for {count} rewards")


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


@dataclass
class GenerationSettings(SamplerOptions, PromptOptions, LoadOptions):
    """What generating needs, whatever the model family: the `generate` stage's flags, checked for what holds in every
    family. A family receives these; the stage's `GenerateConfig` adds the family's own checks."""

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
        require_output_dir(self)
        if self.num_samples < 1:
            raise StageInputError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise StageInputError(f"--shard_size must be >= 1, got {self.shard_size}")
