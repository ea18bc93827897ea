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

SIDECARS = ("generation", "scoring", "weighting", "training", "sampling")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompts(source: str, split: str = "train") -> Dataset:
    """Prompts from a JSONL/JSON/Parquet/CSV file, a `save_to_disk` folder or a Hub dataset id.

    The dataset must have a `prompt` column (plain text) or a `messages` column (chat, rendered later with the
    tokenizer's chat template; a `prompt` column of chat messages, TRL's conversational format, is read as
    `messages`). Other columns (an `answer`, say) travel along to the reward functions.
    """
    path = Path(source)
    if path.is_dir():
        dataset = load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise StageInputError(
                f"--prompts {source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv"
            )
        try:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        except (StopIteration, ValueError) as error:
            # datasets has no row-level message for an empty file: a bare StopIteration (json) or "no data" (csv).
            raise StageInputError(f"--prompts {source}: the prompt set is empty or unreadable ({error!r})") from error
    else:
        dataset = load_dataset(source, split=split)
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
    return dataset


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


def read_sidecars(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Settings recorded by the stages that produced `directory`, keyed by stage."""
    found = {}
    for stage in SIDECARS:
        sidecar = Path(directory) / f"{stage}.json"
        if sidecar.is_file():
            found[stage] = json.loads(sidecar.read_text())
    return found


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
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.incomplete-", dir=output.parent))
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
    finish: Callable[[Dataset], Dataset] | None = None,
) -> Dataset:
    """Compute a stage's dataset shard by shard, split across accelerate processes, resuming where a run stopped.

    Shard k covers items [k * shard_size, (k + 1) * shard_size) and is written by process k % world_size into
    `<output_dir>.partial/`, each made whole atomically (written, then renamed). A re-run with the same settings
    skips the shards already there, whatever the number of processes; a re-run with other settings is refused.
    When every shard exists, the main process concatenates them in order, applies `finish` and writes the stage
    with `save_stage`, so `output_dir` only ever appears complete (replacing an earlier complete run: skipping
    finished stages is `rlfree run`'s job, which also knows when an input changed).
    """
    state = process_state()
    output, partial = Path(output_dir), Path(f"{output_dir}.partial")
    run_file = partial / "run.json"
    # Every process checks (so that all of them stop together); only the main one writes.
    if run_file.is_file():
        different = changed_settings(json.loads(run_file.read_text()), settings)
        if different:
            raise StageInputError(
                f"{partial} holds an unfinished run with other settings ({describe_changes(different)}). "
                f"Re-run with the same flags to finish it, or delete {partial} to start over."
            )
    elif state.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    state.wait_for_everyone()
    shards = [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]
    mine = [k for k in range(len(shards)) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (partial / f"shard-{k:05d}").is_dir()]
    if len(todo) < len(mine):
        print(f"[rank {state.process_index}] resuming: {len(mine) - len(todo)} of {len(mine)} shards already written")
    for k in tqdm(todo, desc=f"{stage} shards (rank {state.process_index}/{state.num_processes})", unit="shard"):
        staging = Path(tempfile.mkdtemp(prefix=f".shard-{k:05d}.incomplete-", dir=partial))
        make_shard(shards[k]).save_to_disk(str(staging))
        staging.rename(partial / f"shard-{k:05d}")
    state.wait_for_everyone()
    if state.is_main_process:
        dataset = concatenate_datasets([load_from_disk(str(partial / f"shard-{k:05d}")) for k in range(len(shards))])
        dataset = finish(dataset) if finish is not None else dataset
        save_stage(dataset, output, stage, settings | {"num_processes": state.num_processes}, input_dir=input_dir)
        shutil.rmtree(partial)
    state.wait_for_everyone()
    return load_from_disk(str(output))
