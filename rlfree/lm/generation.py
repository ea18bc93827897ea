"""The generation stage for causal LMs: rendering prompts, fitting them to the context, drawing with a backend, and
the teacher-forced pass.

Whatever backend drew a completion, `ref_logprob` is log pi_ref(o|q) read here by the same teacher-forced computation
the trainer maximizes (full softmax, temperature 1). `proposal_logprob` is the engine's own log-probability of what it
drew when the backend reports one, and otherwise the teacher-forced log-probability under the sampler's warpers.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import AdapterOff, as_reference
from ..data import load_prompts, nearest_existing, process_state, read_sidecars, run_in_shards
from ..errors import StageInputError
from ..options import GenerationSettings, SamplerOptions
from ..sources import context_length, load_model_config
from .backends import BackendModel, Draw, SamplingBackend, load_backend
from .backends.hf import sampler_processors
from .batching import pad_prompt_completion
from .guidance import GuidedBackend
from .loading import eos_token_ids, load_causal_lm, load_reference, load_tokenizer
from .logprobs import model_completion_logprobs

# Per-token |log p_engine - log pi_ref| above this, on average, is worth a warning: the weights still correct for it,
# but they spread (a mean gap g per token moves a T-token sequence's log-weight by about g·T).
ENGINE_GAP_WARNING = 0.05


def render_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[list[int]]]:
    """Prompt text and ids: `prompt` tokenized as is, or `messages` rendered with the chat template."""
    if "messages" in dataset.column_names:
        if tokenizer.chat_template is None:
            raise StageInputError("the prompts have a 'messages' column but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in dataset["messages"]
        ]
        # The template already holds any BOS token; adding special tokens again would double it.
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    else:
        texts = list(dataset["prompt"])
        ids = [tokenizer(text)["input_ids"] for text in texts]
    for index, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise StageInputError(f"prompt {index} tokenizes to nothing; remove empty prompts from --prompts")
    return texts, ids


def check_same_tokens(
    proposal_path: str,
    proposal_model: PreTrainedModel,
    proposal_tokenizer: PreTrainedTokenizerBase,
    ref_path: str,
    ref_model: PreTrainedModel,
    ref_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The proposal's ids must mean the same tokens to pi_ref, and both must stop on the same EOS ids.

    Otherwise log pi_ref would be read for different text, or over completions pi_ref never ends that way.
    """
    proposal_vocab, ref_vocab = proposal_tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if proposal_vocab != ref_vocab:
        differing = sorted(
            token
            for token in proposal_vocab.keys() | ref_vocab.keys()
            if proposal_vocab.get(token) != ref_vocab.get(token)
        )
        raise StageInputError(
            f"--model_name_or_path {proposal_path} and --ref_model {ref_path} have different vocabularies "
            f"({len(proposal_vocab)} vs {len(ref_vocab)} tokens; {len(differing)} differ, e.g. {differing[:5]}): "
            "the proposal must use pi_ref's tokenizer"
        )
    proposal_eos = eos_token_ids(proposal_model, proposal_tokenizer)
    ref_eos = eos_token_ids(ref_model, ref_tokenizer)
    if proposal_eos != ref_eos:
        raise StageInputError(
            f"--model_name_or_path {proposal_path} stops on EOS ids {proposal_eos} but --ref_model {ref_path} on "
            f"{ref_eos}: set the same eos_token_id in both generation configs"
        )


def model_context(paths: dict[str, str | None], trust_remote_code: bool) -> tuple[int, str] | None:
    """The context of the model(s) sampled and scored ({flag: path}), checked up front: the smallest one."""
    contexts = [
        context_length(load_model_config(flag, path, trust_remote_code)) for flag, path in paths.items() if path
    ]
    return min((context for context in contexts if context is not None), default=None)


def fit_to_context(
    prompt_ids: list[list[int]],
    sampler: SamplerOptions,
    context: tuple[int, str] | None,
    bos_token_id: int | None,
) -> tuple[list[int], list[int]]:
    """Check that every prompt leaves room for --max_new_tokens in the model's context, before anything is created.

    Past its context a model either fails (GPT-2's position table: an IndexError) or silently reads positions it was
    never trained on (rotary models). Returns (indices of the prompts to sample, indices of the prompts cut); with
    `--long_prompts truncate` the over-long prompts are cut in place to their last tokens (after a leading BOS, kept),
    which sit next to the completion.
    """
    everything = list(range(len(prompt_ids)))
    if context is None:
        return everything, []
    positions, name = context
    if sampler.max_new_tokens >= positions:
        raise StageInputError(
            f"--max_new_tokens {sampler.max_new_tokens} leaves no room for a prompt: the model attends over "
            f"{positions} positions ({name})"
        )
    room = positions - sampler.max_new_tokens
    too_long = [index for index, ids in enumerate(prompt_ids) if len(ids) > room]
    if too_long and sampler.long_prompts == "error":
        first = too_long[0]
        raise StageInputError(
            f"prompt {first} has {len(prompt_ids[first])} tokens, but the model attends over {positions} positions "
            f"({name}) and --max_new_tokens {sampler.max_new_tokens} leaves room for {room}; {len(too_long)} "
            f"prompt(s) are too long (indices {too_long[:10]}{' ...' if len(too_long) > 10 else ''}). Shorten them, "
            "lower --max_new_tokens, or pass --long_prompts skip (leave them out) or truncate (keep their last tokens)"
        )
    if sampler.long_prompts == "skip":
        return sorted(set(everything) - set(too_long)), []
    for index in too_long:
        ids = prompt_ids[index]
        keep_bos = bos_token_id is not None and ids[0] == bos_token_id
        prompt_ids[index] = ids[:1] + ids[len(ids) - room + 1 :] if keep_bos else ids[-room:]
    return everything, too_long


def task_tokenizer(name_or_path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """pi_ref's tokenizer, which renders the prompts; a folder without one is a clear error."""
    try:
        return load_tokenizer(name_or_path, trust_remote_code)
    except (OSError, ValueError) as error:
        raise StageInputError(f"{name_or_path}: cannot load the tokenizer ({error})") from None


@dataclass
class PreparedPrompts:
    """Prompts ready to sample: text and ids per prompt, which of them fit the context, and their other columns."""

    texts: list[str]
    prompt_ids: list[list[int]]
    sampled: list[int]  # indices of the prompts sampled (all but those --long_prompts skip left out)
    extras: list[dict]  # each prompt's other columns (an `answer`, `messages`), for the rows and reward functions


def prepare_prompts(
    prompt_rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    sampler: SamplerOptions,
    context: tuple[int, str] | None,
    is_main_process: bool,
) -> PreparedPrompts:
    """Render the prompts, fit them to the context (saying what --long_prompts did) and keep their other columns."""
    texts, prompt_ids = render_prompts(prompt_rows, tokenizer)
    sampled, cut = fit_to_context(prompt_ids, sampler, context, tokenizer.bos_token_id)
    for index in cut:
        texts[index] = tokenizer.decode(prompt_ids[index])
    extra_columns = [name for name in prompt_rows.column_names if name != "prompt"]
    extras = prompt_rows.select_columns(extra_columns).to_list() if extra_columns else [{}] * len(texts)
    if is_main_process and len(sampled) < len(texts):
        print(f"--long_prompts skip: left out {len(texts) - len(sampled)} prompt(s) too long for the context")
    if is_main_process and cut:
        print(f"--long_prompts truncate: kept the last tokens of {len(cut)} prompt(s) too long for the context")
    return PreparedPrompts(texts, prompt_ids, sampled, extras)


def summarize_engine_gap(dataset: Dataset) -> tuple[Dataset, dict]:
    """The run's engine/trainer mismatch from the per-row columns the shards carry, which are then dropped."""
    if "engine_gap_sum" not in dataset.column_names:
        return dataset, {}
    tokens = sum(dataset["num_tokens"])
    gap = {
        "engine_gap_mean": sum(dataset["engine_gap_sum"]) / max(tokens, 1),
        "engine_gap_max": max(dataset["engine_gap_max"], default=0.0),
        "engine_gap_tokens": tokens,
    }
    return dataset.remove_columns(["engine_gap_sum", "engine_gap_max"]), {"engine_mismatch": gap}


def engine_gap_warning(record: dict) -> str | None:
    gap = record.get("engine_mismatch")
    if not gap or gap["engine_gap_mean"] <= ENGINE_GAP_WARNING:
        return None
    return (
        f"the sampling engine's log-probabilities differ from the teacher-forced pi_ref's by {gap['engine_gap_mean']:.3g} "
        f"per token on average (max {gap['engine_gap_max']:.3g}): the weights correct for it exactly, but they spread; "
        "a higher-precision --dtype for the engine narrows it"
    )


@torch.no_grad()
def teacher_forced(
    draws: list[Draw],
    prompt_ids: dict[int, list[int]],
    model: PreTrainedModel,
    ref_model: PreTrainedModel | AdapterOff | None,
    sampler: SamplerOptions,
    pad_token_id: int,
    with_model_logprob: bool = False,
) -> list[dict]:
    """One row per draw with `ref_logprob` and `proposal_logprob`, in batches of `sampler.batch_size`.

    `with_model_logprob` adds `model_logprob`, log pi_theta(o|q) of `model` itself at temperature 1 (guided sampling,
    where the proposal is neither model).

    `model` is the model sampled from; `ref_model` is pi_ref when that is another model. Where the sampling pass gave
    pi_ref's own log-probabilities (`Draw.model_token_logprobs`, no `ref_model`), they are both columns and nothing is
    teacher-forced; with a `ref_model` both sides are teacher-forced, so the correction log pi_ref - log q compares
    two values of one computation. When the backend reported the engine's own log-probabilities they are the
    proposal's, and where the engine sampled pi_ref's own softmax (no `ref_model`, temperature 1, no top-k/top-p) each
    row also records its per-token gap to the teacher-forced log-probabilities (`engine_gap_sum`, `engine_gap_max`),
    which the stage summarizes and drops.
    """
    warpers = sampler_processors(sampler.temperature, sampler.top_k, sampler.top_p)
    scorer = ref_model if ref_model is not None else model
    rows = []
    for start in range(0, len(draws), sampler.batch_size):
        batch = draws[start : start + sampler.batch_size]
        prompts = [prompt_ids[draw.prompt_index] for draw in batch]
        completions = [draw.completion_ids for draw in batch]
        tensors = pad_prompt_completion(prompts, completions, pad_token_id)
        tensors = {key: value.to(model.device) for key, value in tensors.items()}
        # Teacher-forced, in bounded memory: logits of a chunk of completion positions at a time.
        inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["completion_mask"])
        lengths = [len(completion) for completion in completions]
        gaps, extra = None, {}
        if with_model_logprob:
            (model_sums,) = model_completion_logprobs(model, *inputs)
            extra = {"model_logprob": model_sums.tolist()}
        if ref_model is None and batch[0].model_token_logprobs is not None:
            # The sampling pass was pi_ref's own float32 softmax: it already gave log pi_ref, the proposal's too.
            ref_logprob = proposal_logprob = [sum(draw.model_token_logprobs) for draw in batch]
        elif batch[0].proposal_token_logprobs is not None:
            with as_reference(scorer) as reference:
                (ref_tokens,) = model_completion_logprobs(reference, *inputs, per_token=True)
            ref_logprob = [chunk.sum().item() for chunk in ref_tokens.cpu().split(lengths)]
            proposal_logprob = [sum(draw.proposal_token_logprobs) for draw in batch]
            if ref_model is None and sampler.is_plain:
                engine = torch.tensor([value for draw in batch for value in draw.proposal_token_logprobs])
                gaps = (engine - ref_tokens.cpu().double()).abs().split(lengths)
        elif ref_model is None and not warpers:
            # Sampling from pi_ref itself: one log-softmax gives both (half the teacher-forced pass's lm_head work).
            (ref_sums,) = model_completion_logprobs(model, *inputs)
            ref_logprob = proposal_logprob = ref_sums.tolist()
        elif ref_model is None:
            ref_sums, proposal_sums = model_completion_logprobs(model, *inputs, (None, warpers))
            ref_logprob, proposal_logprob = ref_sums.tolist(), proposal_sums.tolist()
        else:
            with as_reference(ref_model) as reference:
                (ref_sums,) = model_completion_logprobs(reference, *inputs)
            (proposal_sums,) = model_completion_logprobs(model, *inputs, (warpers,))
            ref_logprob, proposal_logprob = ref_sums.tolist(), proposal_sums.tolist()
        for row, draw in enumerate(batch):
            rows.append(
                {
                    "prompt_index": draw.prompt_index,
                    "sample_index": draw.sample_index,
                    "completion_ids": draw.completion_ids,
                    "ref_logprob": ref_logprob[row],
                    "proposal_logprob": proposal_logprob[row],
                    "num_tokens": len(draw.completion_ids),
                    "finish_reason": draw.finish_reason,
                }
                | {name: values[row] for name, values in extra.items()}
                | (
                    {"engine_gap_sum": gaps[row].sum().item(), "engine_gap_max": gaps[row].max().item()}
                    if gaps is not None
                    else {}
                )
            )
    return rows


# What one generated row costs, measured on the toy (1.8 KB in memory with 3 new tokens and a 4-token prompt): Python
# objects while its shard is built, then Arrow. A shard is built in memory and written at once.
ROW_BYTES_IN_MEMORY, TOKEN_BYTES_IN_MEMORY = 2048, 64
ROW_BYTES_ON_DISK, TOKEN_BYTES_ON_DISK = 256, 16


def check_size(config: GenerationSettings, prompt_ids: list[list[int]], sampled: list[int]) -> None:
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


def generate_completions(config: GenerationSettings, settings: dict) -> Dataset:
    """The generation stage for a causal LM: shards of `--shard_size` prompts, across `accelerate launch` processes,
    resumed after an interrupt; `settings` is what the stage records about the run."""
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

    settings = settings | {"num_prompts": len(texts)}

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
