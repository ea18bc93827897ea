"""Stage 1: sample N completions per prompt and record their exact log-probabilities.

`ref_logprob` is log pi_ref(o|q) from the model's full softmax at temperature 1, read in a teacher-forced pass over
the exact generated ids; `proposal_logprob` is log p(o|q) of the sampler actually used (temperature, top-k, top-p,
and with `--ref_model` another model altogether). The weighting stage corrects for the difference, so sampling from
any proposal still targets pi_ref.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .data import check_output_dir, folder_stamp, load_prompts, process_state, run_in_shards
from .errors import DTYPES, StageInputError, check_choice, check_finite
from .modeling import (
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
    model_completion_logprobs,
    pad_prompt_completion,
)
from .sources import context_length, load_model_config

LONG_PROMPTS = ("error", "skip", "truncate")


def long_prompts_field() -> Any:
    """The `--long_prompts` flag, the same in every command that samples."""
    return field(
        default="error",
        metadata={
            "help": "A prompt that leaves the model's context no room for --max_new_tokens: stop with an error "
            "naming it (error), leave it out (skip), or keep its last tokens (truncate).",
            "choices": LONG_PROMPTS,
        },
    )


@dataclass
class GenerateConfig:
    """Settings of `rlfree generate`."""

    model_name_or_path: str = field(
        metadata={"help": "Model sampled from, a local folder or a Hub id: pi_ref itself unless --ref_model is set."}
    )
    prompts: str = field(
        metadata={
            "help": "JSONL/JSON/Parquet/CSV file, save_to_disk folder or Hub id with a 'prompt' or 'messages' column."
        }
    )
    output_dir: str = field(metadata={"help": "Where the generated dataset is written (save_to_disk layout)."})
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "Reference model pi_ref when sampling from another model; --model_name_or_path is then the "
            "proposal and needs the same tokenizer. Default: the sampled model is pi_ref."
        },
    )
    num_samples: int = field(default=8, metadata={"help": "Completions sampled per prompt (N)."})
    max_new_tokens: int = field(
        default=256, metadata={"help": "Longest completion; longer ones are cut (finish_reason='length')."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; != 1 is corrected for in the weights."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; < 1 is corrected for in the weights."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off); corrected for in the weights."})
    batch_size: int = field(
        default=64, metadata={"help": "Sequences generated per forward batch (does not change the samples)."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the sampler: each sample's randomness comes from (seed, prompt, sample index)."},
    )
    shard_size: int = field(
        default=64,
        metadata={"help": "Prompts per shard: the unit written at once, split across processes and resumed."},
    )
    long_prompts: str = long_prompts_field()
    prompts_split: str = field(default="train", metadata={"help": "Split to read when --prompts is a Hub dataset."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})

    def __post_init__(self):
        check_finite(self)
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--long_prompts", self.long_prompts, LONG_PROMPTS)
        if self.num_samples < 1:
            raise StageInputError(f"--num_samples must be >= 1, got {self.num_samples}")
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
        if self.shard_size < 1:
            raise StageInputError(f"--shard_size must be >= 1, got {self.shard_size}")


def sampler_processors(temperature: float, top_k: int, top_p: float) -> list:
    """The logits warpers `generate` applies for these settings, in its order (temperature, top-k, top-p)."""
    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


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


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, stable across processes and Python runs (unlike `hash`)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GumbelSampling(LogitsProcessor):
    """Adds Gumbel noise from one generator per row, so that greedy decoding *samples* from the warped softmax.

    argmax(logits + Gumbel noise) is an exact draw from softmax(logits) (the Gumbel-max trick). Each row draws its
    noise from its own generator, seeded from (seed, prompt, sample index), so a sample depends on nothing else:
    not on the batch it shares, the batch size, the shard size or the number of processes.
    """

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=generator, device=generator.device) for generator in self.generators]
        )
        # rand is in [0, 1): a 0 gives -inf noise, and that token is simply never the argmax.
        return scores.float() - torch.log(-torch.log(uniform))


@contextlib.contextmanager
def plain_sampling(model: PreTrainedModel, eos: list[int], pad_token_id: int) -> Iterator[GenerationConfig]:
    """A greedy generation config with no processors of its own: sampling comes only from `GumbelSampling`.

    `generate` fills every unset option from `model.generation_config` (top_k=50 by default, and checkpoints often
    ship temperature, top_p, repetition penalties or suppressed tokens). Swapping in a bare config for the duration
    means the only processors applied are the warpers of `sampler_processors` and the Gumbel noise.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad_token_id)
    try:
        # Greedy decoding never applies the sampling warpers (top_k, top_p, temperature), so they are left unset:
        # setting them here only makes transformers warn on every call. The processors greedy does apply are off.
        yield GenerationConfig(
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_length=0,
            eos_token_id=eos,
            pad_token_id=pad_token_id,
        )
    finally:
        model.generation_config = saved


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


def _split_completion(new_tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    """Cut generated ids after the first EOS (kept) and report why generation stopped."""
    for position, token in enumerate(new_tokens):
        if token in eos:
            return new_tokens[: position + 1], "stop"
    return new_tokens, "length"


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: dict[int, list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    ref_model: PreTrainedModel | None = None,
) -> list[dict]:
    """Sample `num_samples` completions for every prompt (keyed by prompt index); one dict per sample, in order.

    `ref_model` is pi_ref when `model` is another proposal; by default `model` is pi_ref and one teacher-forced pass
    gives both log-probabilities.
    """
    eos = eos_token_ids(model, tokenizer)
    pad_token_id = tokenizer.pad_token_id
    warpers = sampler_processors(temperature, top_k, top_p)
    jobs = [(p, s) for p in prompt_ids for s in range(num_samples)]
    results = []
    with (
        plain_sampling(model, eos, pad_token_id) as generation_config,
        tqdm(total=len(jobs), desc="generate", unit="seq", leave=False) as progress,
    ):
        generation_config.update(max_new_tokens=max_new_tokens)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            prompts = [prompt_ids[p] for p, _ in batch]
            width = max(len(ids) for ids in prompts)
            # Left padding for generation: every row's new tokens start at the same column.
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(prompts):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generators = [torch.Generator(model.device).manual_seed(sample_seed(seed, p, s)) for p, s in batch]
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([*warpers, GumbelSampling(generators)]),
            )
            completions, reasons = zip(
                *(_split_completion(row[width:].tolist(), set(eos)) for row in output), strict=True
            )
            tensors = pad_prompt_completion(prompts, completions, pad_token_id)
            tensors = {key: value.to(model.device) for key, value in tensors.items()}
            # Teacher-forced, in bounded memory: logits of a chunk of completion positions at a time.
            model_inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["completion_mask"])
            if ref_model is None and not warpers:
                # Sampling from pi_ref itself: one log-softmax gives both (half the teacher-forced pass's lm_head work).
                (ref_logprob,) = model_completion_logprobs(model, *model_inputs)
                proposal_logprob = ref_logprob
            elif ref_model is None:
                ref_logprob, proposal_logprob = model_completion_logprobs(model, *model_inputs, (None, warpers))
            else:
                (ref_logprob,) = model_completion_logprobs(ref_model, *model_inputs)
                (proposal_logprob,) = model_completion_logprobs(model, *model_inputs, (warpers,))
            for row, (prompt_index, sample_index) in enumerate(batch):
                results.append(
                    {
                        "prompt_index": prompt_index,
                        "sample_index": sample_index,
                        "completion_ids": list(completions[row]),
                        "ref_logprob": ref_logprob[row].item(),
                        "proposal_logprob": proposal_logprob[row].item(),
                        "num_tokens": len(completions[row]),
                        "finish_reason": reasons[row],
                    }
                )
            progress.update(len(batch))
    return results


def fit_to_context(
    prompt_ids: list[list[int]], config: GenerateConfig, context: tuple[int, str] | None, bos_token_id: int | None
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
    if config.max_new_tokens >= positions:
        raise StageInputError(
            f"--max_new_tokens {config.max_new_tokens} leaves no room for a prompt: the model attends over "
            f"{positions} positions ({name})"
        )
    room = positions - config.max_new_tokens
    too_long = [index for index, ids in enumerate(prompt_ids) if len(ids) > room]
    if too_long and config.long_prompts == "error":
        first = too_long[0]
        raise StageInputError(
            f"prompt {first} has {len(prompt_ids[first])} tokens, but the model attends over {positions} positions "
            f"({name}) and --max_new_tokens {config.max_new_tokens} leaves room for {room}; {len(too_long)} prompt(s) "
            f"are too long (indices {too_long[:10]}{' ...' if len(too_long) > 10 else ''}). Shorten them, lower "
            "--max_new_tokens, or pass --long_prompts skip (leave them out) or truncate (keep their last tokens)"
        )
    if config.long_prompts == "skip":
        return sorted(set(everything) - set(too_long)), []
    for index in too_long:
        ids = prompt_ids[index]
        keep_bos = bos_token_id is not None and ids[0] == bos_token_id
        prompt_ids[index] = ids[:1] + ids[len(ids) - room + 1 :] if keep_bos else ids[-room:]
    return everything, too_long


def model_context(config: GenerateConfig) -> tuple[int, str] | None:
    """The context of the model(s) sampled and scored, checked up front: the smaller one when there are two."""
    contexts = [
        context_length(load_model_config(flag, path, config.trust_remote_code))
        for flag, path in (("--model_name_or_path", config.model_name_or_path), ("--ref_model", config.ref_model))
        if path is not None
    ]
    return min((context for context in contexts if context is not None), default=None)


def generate(config: GenerateConfig) -> Dataset:
    """Run the generation stage: shard by shard, across `accelerate launch` processes, resuming an interrupted run.

    Every sample's randomness comes from (seed, prompt index, sample index), so the dataset is the same whatever the
    batch size, the shard size or the number of processes, and a resumed run equals an uninterrupted one.
    """
    state = process_state()
    prompt_rows = load_prompts(config.prompts, config.prompts_split)
    context = model_context(config)
    # pi_ref defines the task: its tokenizer (and chat template) renders the prompts.
    tokenizer_source = config.ref_model or config.model_name_or_path
    try:
        tokenizer = load_tokenizer(tokenizer_source, config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise StageInputError(f"{tokenizer_source}: cannot load the tokenizer ({error})") from None
    texts, prompt_ids = render_prompts(prompt_rows, tokenizer)
    sampled, cut = fit_to_context(prompt_ids, config, context, tokenizer.bos_token_id)
    for index in cut:
        texts[index] = tokenizer.decode(prompt_ids[index])
    extra_columns = [name for name in prompt_rows.column_names if name != "prompt"]
    extras = prompt_rows.select_columns(extra_columns).to_list() if extra_columns else [{}] * len(texts)

    stamps = {"model_stamp": folder_stamp(config.model_name_or_path)}
    if config.ref_model is not None:
        stamps["ref_model_stamp"] = folder_stamp(config.ref_model)
    settings = asdict(config) | {"num_prompts": len(texts)} | stamps
    inputs = {"--model_name_or_path": config.model_name_or_path, "--ref_model": config.ref_model}
    check_output_dir(config.output_dir, "generation", asdict(config), inputs | {"--prompts": config.prompts})
    if state.is_main_process and len(sampled) < len(texts):
        print(f"--long_prompts skip: left out {len(texts) - len(sampled)} prompt(s) too long for the context")
    if state.is_main_process and cut:
        print(f"--long_prompts truncate: kept the last tokens of {len(cut)} prompt(s) too long for the context")

    @functools.cache
    def models() -> tuple[PreTrainedModel, PreTrainedModel | None]:
        """Loaded on the first shard this process writes: a finished run loads nothing."""
        model = load_causal_lm(config.model_name_or_path, config.dtype, config.trust_remote_code, state.device)
        if config.ref_model is None:
            return model, None
        ref_model = load_causal_lm(config.ref_model, config.dtype, config.trust_remote_code, state.device)
        proposal_tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
        check_same_tokens(config.model_name_or_path, model, proposal_tokenizer, config.ref_model, ref_model, tokenizer)
        return model, ref_model

    def make_shard(positions: range) -> Dataset:
        model, ref_model = models()
        samples = sample_completions(
            model,
            tokenizer,
            {sampled[position]: prompt_ids[sampled[position]] for position in positions},
            num_samples=config.num_samples,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            batch_size=config.batch_size,
            seed=config.seed,
            ref_model=ref_model,
        )
        rows = []
        for sample in samples:
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

    return run_in_shards(config.output_dir, "generation", settings, len(sampled), config.shard_size, make_shard)
