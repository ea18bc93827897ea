"""Reading prompts and passing datasets between stages.

Stages talk only through `datasets` folders written with `save_to_disk`. Each stage also writes a small JSON
sidecar with the settings it used (`generation.json`, `scoring.json`, `weighting.json`; `train` writes
`training.json` last into its model folder) and carries the earlier stages' sidecars forward, so the final model card
can say how its data was made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from tqdm.auto import tqdm

from .errors import StageInputError
from .sources import check_local_exists

SIDECARS = ("generation", "scoring", "classifying", "weighting", "training", "sampling")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompts(source: str, split: str = "train") -> Dataset:
    """Prompts from a JSONL/JSON/Parquet/CSV file, a `save_to_disk` folder or a Hub dataset id.

    The dataset must have a `prompt` column (plain text) or a `messages` column (chat, rendered later with the
    tokenizer's chat template; a `prompt` column of chat messages, TRL's conversational format, is read as
    `messages`). Other columns (an `answer`, say) travel along to the reward functions.
    """
    path = Path(source).expanduser()
    if check_local_exists("--prompts", source, "file or folder", tuple(_FILE_BUILDERS)) and path.is_dir():
        dataset = load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise StageInputError(
                f"--prompts {source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv"
            )
        try:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:
            raise StageInputError(f"--prompts {source}: {_unreadable_file_reason(path, error)}") from None
    else:
        try:
            dataset = load_dataset(source, split=split)
        except Exception as error:
            raise StageInputError(
                f"--prompts {source}: not a local file or folder, and loading it as a Hub dataset failed ({error})"
            ) from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise StageInputError(f"--prompts {source}: no split {split!r}; it has {list(dataset)}")
        dataset = dataset[split]
    if "prompt" not in dataset.column_names and "messages" not in dataset.column_names:
        raise StageInputError(
            f"--prompts {source}: needs a 'prompt' column (text) or a 'messages' column (chat); "
            f"found {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise StageInputError(f"--prompts {source}: the prompt set is empty")
    if "messages" not in dataset.column_names and isinstance(dataset[0]["prompt"], list):
        # TRL's conversational format keeps the chat under `prompt`: it is a `messages` column here.
        dataset = dataset.rename_column("prompt", "messages")
    check_prompt_values(dataset, source)
    return dataset


def _unreadable_file_reason(path: Path, error: Exception) -> str:
    """Why `datasets` could not read a prompt file, with the line of the first malformed JSON row when there is one."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"line {number} is not valid JSON ({bad.msg} at column {bad.colno})"
    elif path.suffix.lower() == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as bad:
            return f"not valid JSON: {bad.msg} at line {bad.lineno}, column {bad.colno}"
    reason = error.__cause__ or error  # datasets wraps the reader's own error
    return f"the prompt set is empty or unreadable ({type(reason).__name__}: {reason})"


def check_prompt_values(dataset: Dataset, source: str) -> None:
    """Every `prompt` must be text and every `messages` a list of {role, content} turns, named by row when not."""
    if "messages" in dataset.column_names:
        for row, messages in enumerate(dataset["messages"]):
            if not isinstance(messages, list) or not all(
                isinstance(turn, dict)
                and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), (str, list))
                for turn in messages
            ):
                raise StageInputError(
                    f"--prompts {source}: row {row}'s messages must be a list of {{'role': ..., 'content': ...}} "
                    f"turns, got {str(messages)[:80]}"
                )
        return
    for row, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str):
            raise StageInputError(
                f"--prompts {source}: row {row}'s prompt is {type(prompt).__name__} {prompt!r:.40}, not text"
            )


def load_stage(
    input_dir: str | os.PathLike, required: tuple[str, ...] = (), hint: str = "", flag: str = "--input_dir"
) -> Dataset:
    """Load an earlier stage's output and check it has the columns this stage needs; errors name `flag`."""
    path = Path(input_dir)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise StageInputError(f"{flag} {path}: not a dataset folder written by an rlfree stage")
    dataset = load_from_disk(str(path))
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise StageInputError(f"{flag} {path}: missing column(s) {missing}. {hint}".rstrip())
    if len(dataset) == 0:
        raise StageInputError(f"{flag} {path}: the dataset is empty")
    return dataset


def folder_stage(directory: str | os.PathLike) -> str | None:
    """The stage whose complete output `directory` is: the last stage whose sidecar it holds (the earlier stages'
    sidecars are carried forward), or None."""
    present = [stage for stage in SIDECARS if (Path(directory) / f"{stage}.json").is_file()]
    return present[-1] if present else None


def recorded_changes(directory: str | os.PathLike, stage: str, settings: dict[str, Any]) -> dict | None:
    """None when `directory` holds no complete output of `stage` (named by its sidecar); else the settings that differ
    from the recorded ones, {} when none do. Unset (None) values are not compared: a stage records values it fills in
    itself, such as a solved beta."""
    if folder_stage(directory) != stage:
        return None
    recorded = read_sidecars(directory)[stage]
    return changed_settings(recorded, {key: value for key, value in settings.items() if value is not None})


def check_output_dir(
    output_dir: str | os.PathLike,
    stage: str,
    flags: dict[str, Any],
    inputs: dict[str, str | None],
    allow_unfinished: bool = False,
) -> None:
    """Refuse, before anything is created, an --output_dir that writing this stage would destroy or cannot make.

    A stage replaces its whole output folder, so the folder must be new, empty, or this stage's own output written
    with the same `flags`; an existing file, one of the stage's `inputs` ({flag: path}), a folder of something else
    and a complete output written with other flags are refused, naming the fix. Only what the user typed is compared:
    the same command run again after an input or a reward function changed recomputes the output, as it should.
    `allow_unfinished` accepts a non-empty folder with no sidecar yet (an interrupted `train` left it).
    """
    output = Path(output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise StageInputError(
            f"--output_dir {output_dir} is an existing file: give a folder path that is new or empty"
        )
    for flag, path in inputs.items():
        if path is not None and Path(path).expanduser().exists() and output.resolve() == Path(path).resolve():
            raise StageInputError(
                f"--output_dir {output_dir} is {flag}: the stage would replace its own input; choose another folder"
            )
    if output.is_dir() and any(output.iterdir()):
        own = folder_stage(output)
        if own is None and not allow_unfinished:
            raise StageInputError(
                f"--output_dir {output_dir} is a folder that already holds other files, and a stage replaces its "
                "whole output folder: give a new or empty folder"
            )
        if own is not None and own != stage:
            raise StageInputError(
                f"--output_dir {output_dir} holds the output of another stage ({own}); give a new or empty folder"
            )
        different = recorded_changes(output, stage, flags)
        if different:
            raise StageInputError(
                f"--output_dir {output_dir} already holds a complete `{stage}` output written with other settings "
                f"({describe_changes(different)}); it is not replaced. Delete it, or choose another --output_dir"
            )
    check_writable(output)


def check_writable(output: Path) -> None:
    """A stage writes beside its output folder (a staging folder renamed into place): that place must be writable."""
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StageInputError(f"--output_dir {output}: {parent} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise StageInputError(f"--output_dir {output}: cannot write in {parent} ({error.strerror})") from None


def read_sidecars(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Settings recorded by the stages that produced `directory`, keyed by stage."""
    found = {}
    for stage in SIDECARS:
        sidecar = Path(directory) / f"{stage}.json"
        if sidecar.is_file():
            found[stage] = json.loads(sidecar.read_text())
    return found


def make_staging_dir(prefix: str, parent: Path) -> Path:
    """A new temporary folder in `parent`, with the permissions the umask gives a new folder.

    `mkdtemp` makes it 0700, and renaming it into place would keep that: on a shared cluster nobody else could read the
    stage's output.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def save_stage(
    dataset: Dataset,
    output_dir: str | os.PathLike,
    stage: str,
    settings: dict[str, Any],
    input_dir: str | os.PathLike | None = None,
) -> None:
    """Write `dataset` and its sidecars to `output_dir` atomically.

    Everything is written into a temporary sibling folder that is renamed into place only when complete, so an
    interrupted run never leaves a folder that loads as if it were whole.
    """
    output = Path(output_dir).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(f".{output.name}.incomplete-", output.parent)
    try:
        dataset.save_to_disk(str(staging))
        carried = read_sidecars(input_dir) if input_dir is not None else {}
        carried[stage] = settings
        for name, content in carried.items():
            (staging / f"{name}.json").write_text(json.dumps(content, indent=2, default=str) + "\n")
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(retired / output.name)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# Settings that change how a stage runs but not what it writes: a resumed or repeated run may differ in them.
RUN_ONLY_SETTINGS = ("batch_size",)


def stale_partial(run_file: Path, settings: dict[str, Any], finish_only: tuple[str, ...]) -> dict[str, tuple]:
    """The settings of an unfinished run (its `run.json`) that differ from this run's: its shards must not be kept.

    An unreadable `run.json` (a crash while it was written) counts as different.
    """
    if not run_file.is_file():
        return {}
    try:
        recorded = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        return {"run.json": ("unreadable", "this run")}
    return {key: change for key, change in changed_settings(recorded, settings).items() if key not in finish_only}


def changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{name: (recorded, now)} for the settings that differ, compared as they read back from JSON.

    Settings that only change how a stage runs (`RUN_ONLY_SETTINGS`) are not compared.
    """
    as_json = json.loads(json.dumps(settings, default=str))
    return {
        key: (recorded.get(key), value)
        for key, value in as_json.items()
        if key not in RUN_ONLY_SETTINGS and recorded.get(key) != value
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changes.items()))


def folder_stamp(name_or_path: str) -> float | None:
    """When a local model folder last changed (None for a Hub id): unfinished shards of an older model are stale."""
    path = Path(name_or_path)
    if not path.is_dir():
        return None
    return max((file.stat().st_mtime for file in path.rglob("*") if file.is_file()), default=None)


def process_state():
    """The accelerate process state: rank and world size under `accelerate launch`, one process otherwise.

    On a machine without an accelerator the processes run on CPU over gloo (without `cpu=True`, accelerate would
    not start a process group there and every rank would do all the work).
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=torch.accelerator.current_accelerator() is None)


def run_in_shards(
    output_dir: str | os.PathLike,
    stage: str,
    settings: dict[str, Any],
    num_items: int,
    shard_size: int,
    make_shard: Callable[[range], Dataset],
    input_dir: str | os.PathLike | None = None,
    finish: Callable[[Dataset], tuple[Dataset, dict[str, Any]]] | None = None,
    finish_only: tuple[str, ...] = (),
) -> Dataset:
    """Compute a stage's dataset shard by shard, split across accelerate processes, resuming where a run stopped.

    Shard k covers items [k * shard_size, (k + 1) * shard_size) and is written by process k % world_size into
    `<output_dir>.partial/`, each made whole atomically (written, then renamed). A re-run with the same settings
    skips the shards already there, whatever the number of processes. Shards computed with other settings (another
    model, a reward function whose code changed since) are discarded and recomputed, so a corrected command goes on
    instead of being trapped by its failed run, and no result of the old code is kept; `finish_only` names settings
    that only `finish` reads (dropping invalid rows, say), which therefore keep the shards.
    When every shard exists, the main process concatenates them in order, applies `finish` (which returns the final
    dataset and a record for the sidecar: a summary the shards carried in columns, say) and writes the stage
    with `save_stage`, so `output_dir` only ever appears complete (replacing an earlier complete run: skipping
    finished stages is `rlfree run`'s job, which also knows when an input changed).
    """
    state = process_state()
    output, partial = Path(output_dir), Path(f"{output_dir}.partial")
    run_file = partial / "run.json"
    if state.is_main_process:
        different = stale_partial(run_file, settings, finish_only)
        if different:
            shards = len(list(partial.glob("shard-*")))
            print(
                f"{partial}: discarding an unfinished run's {shards} shard(s), computed with other settings "
                f"({describe_changes(different)}); starting over"
            )
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        # Rewritten on every run, atomically, so the finish-only settings on record are this run's.
        staged_run_file = partial / ".run.json.incomplete"
        staged_run_file.write_text(json.dumps(settings, indent=2, default=str) + "\n")
        staged_run_file.replace(run_file)
    state.wait_for_everyone()
    shards = [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]
    mine = [k for k in range(len(shards)) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (partial / f"shard-{k:05d}").is_dir()]
    if len(todo) < len(mine):
        print(f"[rank {state.process_index}] resuming: {len(mine) - len(todo)} of {len(mine)} shards already written")
    for k in tqdm(todo, desc=f"{stage} shards (rank {state.process_index}/{state.num_processes})", unit="shard"):
        staging = make_staging_dir(f".shard-{k:05d}.incomplete-", partial)
        make_shard(shards[k]).save_to_disk(str(staging))
        staging.rename(partial / f"shard-{k:05d}")
    state.wait_for_everyone()
    if state.is_main_process:
        dataset = concatenate_datasets([load_from_disk(str(partial / f"shard-{k:05d}")) for k in range(len(shards))])
        dataset, record = finish(dataset) if finish is not None else (dataset, {})
        record = settings | {"num_processes": state.num_processes} | record
        save_stage(dataset, output, stage, record, input_dir=input_dir)
        shutil.rmtree(partial)
    state.wait_for_everyone()
    return load_from_disk(str(output))
