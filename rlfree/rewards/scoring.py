"""Rewards with TRL's GRPO signature, `f(prompts, completions, **kwargs) -> list[float]`, and reward models.

Every other dataset column arrives as a keyword argument, so reward functions written for TRL plug in unchanged; a
`transformers` sequence-classification model is a reward too. Several rewards combine as a weighted sum; each keeps
its own column.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..data import folder_stamp
from ..device import default_device
from ..errors import StageInputError
from ..options import split_reward_spec

RewardFunction = Callable[..., list[float]]


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
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            sys.modules.pop(module_name, None)
            raise StageInputError(f"--reward {spec!r}: importing {path} {failure(error)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise StageInputError(f"--reward {spec!r}: cannot import module {target!r} ({error})") from error
        except (Exception, SystemExit) as error:
            raise StageInputError(f"--reward {spec!r}: importing {target} {failure(error)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise StageInputError(f"--reward {spec!r}: {target} has no function {name!r}")
    return function


def failure(error: BaseException) -> str:
    """What went wrong in a user's reward code, in one line: "raised E: message (at file:line, in function)". A syntax
    error names its own line; `sys.exit` is named as such (a reward must return its values, not end the process)."""
    if isinstance(error, SyntaxError):
        return f"failed: {error.msg} (at {error.filename}:{error.lineno})"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = f"(at {frame.filename}:{frame.lineno}, in {frame.name})"
    if isinstance(error, SystemExit):
        called = "sys.exit()" if error.code is None else f"sys.exit({error.code!r})"
        return f"called {called} {where} instead of returning its values"
    return f"raised {type(error).__name__}: {error} {where}"


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


def reward_fingerprints(config) -> list:
    """What a scoring run's rewards are, beyond their names: each --reward's code fingerprint and each --reward_model
    folder's last change (None for a Hub id), in the order of --reward then --reward_model (the paths themselves are
    compared as settings, by the place they name). Part of the settings every re-run must match."""
    return [code_fingerprint(spec) for spec in config.reward] + [folder_stamp(path) for path in config.reward_model]


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
    except (Exception, SystemExit) as error:
        raise StageInputError(
            f"reward {name} {failure(error)} while scoring {rows}. Fix the function and re-run the same command: the "
            "rows scored before are recomputed with the new code"
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
            if isinstance(value, (str, bytes)):  # float("1.0") would pass: a reward is a number, not its text
                raise TypeError
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
    # Array columns (a diffusion model's images and samples) reach the rewards as numpy arrays, one per row.
    arrays = [name for name, feature in dataset.features.items() if type(feature).__name__.startswith("Array")]
    rows = dataset.with_format("numpy", columns=arrays, output_all_columns=True) if arrays else dataset
    for function in functions:
        name = _reward_name(function, taken)
        names.append(name)
        values: list[float] = []
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"score {name}", unit="batch", leave=False):
            batch = rows[start : start + batch_size]
            for column in arrays:
                batch[column] = list(batch[column])
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
