"""Stage 2: score every completion.

A reward is a Python function with TRL's GRPO signature, `f(prompts, completions, **kwargs) -> list[float]`
(every other dataset column arrives as a keyword argument, so reward functions written for TRL plug in unchanged),
or a `transformers` sequence-classification reward model. Several rewards combine as a weighted sum; each keeps
its own column.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .data import check_output_dir, folder_stamp, load_stage, process_state, run_in_shards
from .errors import StageInputError, check_finite
from .modeling import default_device
from .sources import load_model_config

RewardFunction = Callable[..., list[float]]


def reward_functions_field() -> Any:
    """The `--reward` flag, the same in every command that scores completions."""
    return field(
        default_factory=list,
        metadata={"help": "Reward function(s) as path/to/file.py:FUNC or package.module:FUNC (TRL signature)."},
    )


def reward_models_field() -> Any:
    """The `--reward_model` flag, the same in every command that scores completions."""
    return field(
        default_factory=list, metadata={"help": "Sequence-classification reward model(s): local folder or Hub id."}
    )


@dataclass
class ScoreConfig:
    """Settings of `rlfree score`."""

    input_dir: str = field(metadata={"help": "Output folder of `rlfree generate`."})
    output_dir: str = field(metadata={"help": "Where the scored dataset is written."})
    reward: list[str] = reward_functions_field()
    reward_model: list[str] = reward_models_field()
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the rewards in the sum, in order: --reward ones, then --reward_model ones."},
    )
    drop_invalid_rewards: bool = field(
        default=False,
        metadata={"help": "Drop rows whose reward is NaN/inf/None instead of stopping with an error."},
    )
    batch_size: int = field(default=64, metadata={"help": "Completions scored per call."})
    shard_size: int = field(
        default=1024,
        metadata={"help": "Completions per shard: the unit written at once, split across processes and resumed."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom reward-model code from the Hub."})

    def __post_init__(self):
        check_finite(self)
        check_reward_flags(self.reward, self.reward_model)
        count = len(self.reward) + len(self.reward_model)
        if self.reward_weights is not None and len(self.reward_weights) != count:
            raise StageInputError(f"--reward_weights has {len(self.reward_weights)} values for {count} rewards")
        if self.shard_size < 1:
            raise StageInputError(f"--shard_size must be >= 1, got {self.shard_size}")


def split_reward_spec(spec: str) -> tuple[str, str]:
    """(file or module, function name) of `path/to/file.py:FUNC` or `package.module:FUNC`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise StageInputError(f"--reward {spec!r}: expected path/to/file.py:FUNC or package.module:FUNC")
    return target, name


def check_reward_flags(reward: list[str], reward_model: list[str]) -> None:
    """At least one reward, each --reward well formed: checked when the flags are parsed, before anything is made."""
    if not reward and not reward_model:
        raise StageInputError("give at least one --reward path/to/file.py:FUNC or --reward_model PATH")
    for spec in reward:
        split_reward_spec(spec)


def load_reward_function(spec: str) -> RewardFunction:
    """Import `path/to/file.py:FUNC` or `package.module:FUNC`."""
    target, name = split_reward_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise StageInputError(f"--reward {spec!r}: file {path} not found")
        module_name = f"rlfree_reward_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise StageInputError(f"--reward {spec!r}: cannot import module {target!r} ({error})") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise StageInputError(f"--reward {spec!r}: {target} has no function {name!r}")
    return function


def code_fingerprint(spec: str) -> str | None:
    """A hash of the source file a --reward names (the .py file, or the module's file), read without running it;
    None when there is no such file. Shards scored by other code are not kept (what that file imports is not
    followed)."""
    target, _ = split_reward_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
    else:
        try:
            module_spec = importlib.util.find_spec(target)
        except ImportError:
            return None
        path = Path(module_spec.origin) if module_spec is not None and module_spec.origin else None
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def reward_fingerprints(config) -> dict[str, Any]:
    """What a scoring run's rewards are, beyond their names: each --reward's code fingerprint and each --reward_model
    folder's last change (None for a Hub id). Part of the settings every re-run must match."""
    return {spec: code_fingerprint(spec) for spec in config.reward} | {
        path: folder_stamp(path) for path in config.reward_model
    }


class RewardModel:
    """A sequence-classification reward model scoring prompt + completion (chat-formatted when the data is chat)."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, device: torch.device | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            .to(device or default_device())
            .eval()
        )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.__name__ = Path(name_or_path).name

    def _texts(self, prompts: list, completions: list) -> tuple[list[str], bool]:
        """The text to score, and whether it was rendered with the chat template (which holds any BOS itself)."""
        if not completions or isinstance(completions[0], str):
            return [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)], False
        chats = [list(prompt) + list(completion) for prompt, completion in zip(prompts, completions, strict=True)]
        if self.tokenizer.chat_template is None:
            return ["\n".join(str(turn["content"]) for turn in chat) for chat in chats], False
        return [self.tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats], True

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        """Scores in TRL's convention: text prompts and completions, or conversations and assistant turns."""
        texts, templated = self._texts(prompts, completions)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, add_special_tokens=not templated, return_tensors="pt"
        ).to(self.model.device)
        return self.model(**batch).logits[:, 0].float().tolist()


def _reward_name(function: RewardFunction, taken: set[str]) -> str:
    name = f"reward_{getattr(function, '__name__', type(function).__name__)}"
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def reward_inputs(batch: dict[str, list]) -> tuple[list, list, dict[str, list]]:
    """`prompts`, `completions` and the keyword columns, as TRL's GRPOTrainer passes them to a reward function.

    Chat prompts (a `messages` column) arrive in TRL's conversational format: each prompt is its list of messages and
    each completion `[{"role": "assistant", "content": text}]`, so reward functions written for TRL that read
    `completion[0]["content"]` work unchanged. Text prompts arrive as strings.
    """
    kwargs = {key: value for key, value in batch.items() if key not in ("prompt", "completion", "messages")}
    if "messages" not in batch:
        return batch["prompt"], batch["completion"], kwargs
    completions = [[{"role": "assistant", "content": text}] for text in batch["completion"]]
    return batch["messages"], completions, kwargs


def _score_batch(function: RewardFunction, name: str, batch: dict[str, list], offset: int) -> list[float]:
    rows = f"rows {offset}..{offset + len(batch['completion']) - 1}"
    prompts, completions, kwargs = reward_inputs(batch)
    try:
        values = function(prompts=prompts, completions=completions, **kwargs)
    except Exception as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        raise StageInputError(
            f"reward {name} raised {type(error).__name__}: {error} (at {frame.filename}:{frame.lineno}, in "
            f"{frame.name}) while scoring {rows}. Fix the function and re-run the same command: the rows scored "
            "before are recomputed with the new code"
        ) from error
    if values is None or isinstance(values, (str, bytes, int, float)) or not hasattr(values, "__len__"):
        raise StageInputError(
            f"reward {name} returned {type(values).__name__} {values!r:.40} for {rows}: it must return a list with "
            "one float per completion"
        )
    values = list(values)
    if len(values) != len(completions):
        raise StageInputError(
            f"reward {name} returned {len(values)} values for {len(completions)} completions ({rows}); "
            "it must return one float per completion"
        )
    floats = []
    for position, value in enumerate(values):
        try:
            floats.append(math.nan if value is None else float(value))
        except (TypeError, ValueError):
            raise StageInputError(
                f"reward {name} returned {type(value).__name__} {value!r:.40} for row {offset + position}: "
                "rewards must be numbers (None marks an invalid one)"
            ) from None
    return floats


def score_dataset(
    dataset: Dataset,
    functions: list[RewardFunction],
    weights: list[float] | None = None,
    batch_size: int = 64,
    first_row: int = 0,
) -> Dataset:
    """Add one `reward_<name>` column per function and their weighted sum as `reward`. Non-finite values stay NaN.

    `first_row` is the row number of `dataset`'s first row in the whole stage, for error messages.
    """
    weights = weights or [1.0] * len(functions)
    names, taken = [], set(dataset.column_names)
    columns: dict[str, list[float]] = {}
    for function in functions:
        name = _reward_name(function, taken)
        names.append(name)
        values: list[float] = []
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"score {name}", unit="batch", leave=False):
            batch = dataset[start : start + batch_size]
            values.extend(_score_batch(function, name, batch, first_row + start))
        columns[name] = values
    total = [
        sum(w * columns[name][row] for w, name in zip(weights, names, strict=True)) for row in range(len(dataset))
    ]
    for name in names:
        dataset = dataset.add_column(name, columns[name])
    if "reward" in dataset.column_names:
        dataset = dataset.remove_columns("reward")
    return dataset.add_column("reward", total)


def check_rewards(dataset: Dataset, drop_invalid: bool) -> Dataset:
    """Stop on a NaN/inf/None reward naming the row, or drop such rows and say how many."""
    bad = [row for row, value in enumerate(dataset["reward"]) if not math.isfinite(value)]
    if not bad:
        return dataset
    if not drop_invalid:
        first = dataset[bad[0]]
        raise StageInputError(
            f"reward is NaN/inf/None for {len(bad)} row(s); first: row {bad[0]} (prompt_index "
            f"{first.get('prompt_index')}, sample_index {first.get('sample_index')}, completion "
            f"{first['completion'][:80]!r}). Fix the reward function or pass --drop_invalid_rewards"
        )
    if len(bad) == len(dataset):
        raise StageInputError(f"every one of the {len(dataset)} rewards is NaN/inf/None: nothing is left to weight")
    print(f"dropped {len(bad)} of {len(dataset)} rows with a NaN/inf/None reward")
    keep = sorted(set(range(len(dataset))) - set(bad))
    return dataset.select(keep)


def score(config: ScoreConfig) -> Dataset:
    """Run the scoring stage: shard by shard, across `accelerate launch` processes, resuming an interrupted run."""
    state = process_state()
    dataset = load_stage(config.input_dir, ("prompt", "completion"), hint="Score the output of `rlfree generate`.")
    reward_functions = [load_reward_function(spec) for spec in config.reward]
    for path in config.reward_model:
        load_model_config("--reward_model", path, config.trust_remote_code)
    # The input's fingerprint ties unfinished shards to the data they scored, the rewards' to the code that scored
    # them: a regenerated input or an edited reward function starts over.
    settings = asdict(config) | {
        "input_fingerprint": dataset._fingerprint,
        "reward_fingerprints": reward_fingerprints(config),
    }
    check_output_dir(config.output_dir, "scoring", asdict(config), {"--input_dir": config.input_dir})

    @functools.cache
    def functions() -> list[RewardFunction]:
        """Loaded on the first shard this process scores: a finished run loads no reward model."""
        return reward_functions + [
            RewardModel(path, config.trust_remote_code, state.device) for path in config.reward_model
        ]

    def make_shard(rows: range) -> Dataset:
        return score_dataset(dataset.select(rows), functions(), config.reward_weights, config.batch_size, rows.start)

    return run_in_shards(
        config.output_dir,
        "scoring",
        settings,
        len(dataset),
        config.shard_size,
        make_shard,
        input_dir=config.input_dir,
        finish=lambda scored: check_rewards(scored, config.drop_invalid_rewards),
        finish_only=("drop_invalid_rewards",),
    )
