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
from .sources import check_local_exists, content_fingerprint

SIDECARS = ("generation", "scoring", "classifying", "weighting", "training", "sampling")
# The columns each stage writes (a stage's rows also keep every column of its input). Scoring also writes one
# `reward_<name>` column per reward. A prompt file may not carry these names: its other columns travel along every
# row, where such a column would replace the stage's own (a TRL prompt-completion file's gold `completion` in place of
# the sampled one), or be replaced by it.
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "generation": (
        "prompt_index", "sample_index", "completion", "prompt_ids", "completion_ids", "ref_logprob",
        "proposal_logprob", "model_logprob", "num_tokens", "finish_reason", "engine_gap_sum", "engine_gap_max",
        "sample", "class_label",
    ),
    "scoring": ("reward",),
    "classifying": ("class_log_ratio", "class_log_ratio_stderr"),
    "weighting": (
        "log_weight", "weight", "ess", "kl_estimate", "kl_ref_estimate", "max_weight", "beta", "rlif_exponent",
    ),
    "sampling": (
        "pick_index", "pick_probability", "cost_sequences", "cost_tokens", "cost_model_tokens", "cost_reward_calls",
        "rollouts", "clipped_rollouts",
    ),
}  # fmt: skip
REWARD_COLUMN_PREFIX = "reward_"
# The earlier results a stage makes stale when it runs on a folder that already holds them: scoring again replaces the
# reward, and with it the weights computed from the old one. Their columns are dropped from the input and their
# sidecars are not carried into the output, so `train` cannot take weights of one reward beside a card naming another.
REPLACES: dict[str, tuple[str, ...]] = {
    "scoring": ("scoring", "weighting"),
    "classifying": ("classifying",),
    "weighting": ("weighting",),
    "sampling": ("sampling",),
}
# What `save_to_disk` writes into a dataset folder; with the sidecars, everything a stage's output folder holds.
DATASET_FILES = ("dataset_info.json", "state.json", "data-*.arrow")
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
        if builder != "parquet":
            check_utf8(path, f"--prompts {source}")
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
    check_prompt_columns(dataset.column_names, source)
    if "messages" not in dataset.column_names and isinstance(dataset[0]["prompt"], list):
        # TRL's conversational format keeps the chat under `prompt`: it is a `messages` column here.
        dataset = dataset.rename_column("prompt", "messages")
    check_prompt_values(dataset, source)
    return dataset


def check_utf8(path: Path, what: str) -> None:
    """A text file must be UTF-8: name the first line that is not (read line by line, so a large file costs no memory).

    `datasets` reads such a file without complaint and fails later, deep inside pyarrow, when a row is read.
    """
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise StageInputError(
                    f"{what}: line {number} is not UTF-8 text (byte {line[bad.start]:#04x} at column {bad.start + 1}); "
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def check_prompt_columns(columns: list[str], source: str) -> None:
    """Refuse prompt columns named like a column a stage writes (`STAGE_COLUMNS`): every other prompt column is copied
    onto each of the prompt's rows, where it would replace the stage's own (or be replaced by it)."""
    reserved = set().union(*STAGE_COLUMNS.values())
    clashes = [name for name in columns if name in reserved or name.startswith(REWARD_COLUMN_PREFIX)]
    if clashes:
        renames = ", ".join(f"{name!r} -> 'gold_{name}'" for name in clashes)
        raise StageInputError(
            f"--prompts {source}: column(s) {clashes} have the names of columns rlfree's stages write (the sampled "
            "completion, its ids, log-probabilities, rewards, weights), so the file's values would take their place "
            f"or be lost. Rename them in (a copy of) the prompt set, e.g. {renames}: every other column reaches the "
            "reward functions as a keyword argument under its own name"
        )


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
    input_dir: str | os.PathLike,
    required: tuple[str, ...] = (),
    hint: str = "",
    flag: str = "--input_dir",
    stage: str | None = None,
) -> Dataset:
    """Load an earlier stage's output and check it has the columns this stage needs; errors name `flag`.

    `stage`: the stage about to run on it, whose `REPLACES` columns (its own earlier results, and what was computed
    from them) are dropped, saying so.
    """
    path = Path(input_dir)
    if not path.exists():
        partial = path.with_name(f"{path.name}.partial")
        unfinished = f" ({partial.name} beside it holds an unfinished run: run its stage again to finish it)"
        raise StageInputError(f"{flag} {path}: no such folder{unfinished if partial.is_dir() else ''}")
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise StageInputError(f"{flag} {path}: not a dataset folder written by an rlfree stage")
    dataset = load_from_disk(str(path))
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise StageInputError(f"{flag} {path}: missing column(s) {missing}. {hint}".rstrip())
    if len(dataset) == 0:
        raise StageInputError(f"{flag} {path}: the dataset is empty")
    replaced = {name: stage_columns(name, dataset.column_names) for name in REPLACES.get(stage, ())}
    stale = [column for columns in replaced.values() for column in columns]
    if stale and process_state().is_main_process:
        print(
            f"{flag} {path} already holds {' and '.join(name for name, columns in replaced.items() if columns)} "
            f"results; this {stage} replaces them, so its output leaves out {', '.join(stale)}"
            + (" (weight it again)" if replaced.get("weighting") and stage != "weighting" else "")
        )
    return dataset.remove_columns(stale) if stale else dataset


def stage_columns(stage: str, column_names: list[str]) -> list[str]:
    """The columns among `column_names` that `stage` writes (`STAGE_COLUMNS`; scoring's `reward_<name>` too)."""
    prefix = REWARD_COLUMN_PREFIX if stage == "scoring" else None
    return [
        name
        for name in column_names
        if name in STAGE_COLUMNS[stage] or (prefix is not None and name.startswith(prefix))
    ]


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

    A dataset stage replaces its whole output folder, so the folder must be new, empty, or this stage's own output
    written with the same `flags`, holding nothing but what the stage wrote. An existing file, one of the stage's
    `inputs` ({flag: path}) or a folder inside or around one, a folder of something else, a complete output written
    with other flags and a complete output holding a user's files are refused, naming the fix. Only what the user
    typed is compared (paths by the place they name): the same command run again after an input or a reward function
    changed recomputes the output, as it should. `allow_unfinished` accepts a non-empty folder with no sidecar yet (an
    interrupted `train` left it); `train` writes into its model folder instead of replacing it.
    """
    output = Path(output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise StageInputError(
            f"--output_dir {output_dir} is an existing file: give a folder path that is new or empty"
        )
    for flag, path in inputs.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        where = Path(path).expanduser().resolve()
        if output.resolve() == where:
            raise StageInputError(
                f"--output_dir {output_dir} is {flag}: the stage would replace its own input; choose another folder"
            )
        if where in output.resolve().parents:
            raise StageInputError(
                f"--output_dir {output_dir} is inside {flag} {path}: whatever rewrites {path} (the stage that wrote it, "
                "a new model) would delete or change it; choose a folder outside it"
            )
        if output.resolve() in where.parents:
            raise StageInputError(
                f"--output_dir {output_dir} holds {flag} {path}: writing the stage would replace its own input; "
                "choose another folder"
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
        foreign = foreign_entries(output) if own == stage and stage != "training" else []
        if foreign:
            raise StageInputError(
                f"--output_dir {output_dir} holds the stage's output and also {', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}, which the stage did not write; writing it again replaces the "
                "whole folder, so move those out first, or choose another --output_dir"
            )
    check_writable(output)


def foreign_entries(folder: Path) -> list[str]:
    """Names in a dataset stage's output folder that no rlfree stage wrote there: a user's notes, another stage's
    output. (`grids/` is the diffusion generation's picture of its samples; `inspect/` is `rlfree inspect`'s default
    report on the folder, which a new output makes stale.)"""
    own = {f"{stage}.json" for stage in SIDECARS} | {"grids", "inspect"}
    return sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in folder.iterdir()
        if entry.name not in own and not any(entry.match(pattern) for pattern in DATASET_FILES)
    )


def check_writable(output: Path) -> None:
    """A stage writes beside its output folder (a staging folder renamed into place): that place must be writable."""
    parent = nearest_existing(output.resolve().parent)
    if not parent.is_dir():
        raise StageInputError(f"--output_dir {output}: {parent} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise StageInputError(f"--output_dir {output}: cannot write in {parent} ({error.strerror})") from None


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where the folders a stage makes would be made."""
    while not path.exists():
        path = path.parent
    return path


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
        carried = {name: content for name, content in carried.items() if name not in REPLACES.get(stage, ())}
        carried[stage] = with_working_dir(settings)
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
# `working_dir` is where a run was started: what the relative paths among its settings are relative to.
RUN_ONLY_SETTINGS = ("batch_size", "working_dir")
# Settings that name a file or folder: the same place, however it was spelled (relative or absolute, through a
# symlink), is the same setting. The first group is always a local path; the second may also be a Hub id (or, for
# `reward`, a module), which is compared as written. A prompt set is the same also where a copy elsewhere has the
# same contents, which its stage records as `prompts_fingerprint`.
LOCAL_PATH_SETTINGS = ("input_dir", "output_dir", "dataset_dir")
PATH_SETTINGS = LOCAL_PATH_SETTINGS + (
    "model_name_or_path",
    "ref_model",
    "rollout_model",
    "reward_model",
    "prompts",
    "reward",
)
CONTENT_FINGERPRINTS = {"prompts": "prompts_fingerprint"}


def with_working_dir(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a stage records them: with the folder the run was started in, so that the relative paths among
    them can be compared with a later run's from anywhere."""
    return settings | {"working_dir": os.getcwd()}


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

    Settings that only change how a stage runs (`RUN_ONLY_SETTINGS`) are not compared; paths are compared by the place
    they name (`PATH_SETTINGS`), the recorded ones relative to the folder their run was started in.
    """
    as_json = json.loads(json.dumps(settings, default=str))
    recorded_base = Path(recorded.get("working_dir") or os.getcwd())
    changes = {}
    for key, value in as_json.items():
        old = recorded.get(key)
        if key in RUN_ONLY_SETTINGS:
            continue
        if key in PATH_SETTINGS:  # `data` typed in another folder is another place
            if _place(key, old, recorded_base) == _place(key, value, Path.cwd()):
                continue
        elif old == value:
            continue
        fingerprint = CONTENT_FINGERPRINTS.get(key)
        if (
            fingerprint
            and recorded.get(fingerprint) is not None
            and recorded[fingerprint] == content_fingerprint(value)
        ):
            continue
        changes[key] = (old, value)
    return changes


def _place(key: str, value: Any, base: Path) -> Any:
    """The place a path setting names, relative paths taken from `base`: resolved when it is a local path (always, for
    `LOCAL_PATH_SETTINGS`), as written otherwise (a Hub id, a module); a `file.py:FUNC` reward by its file."""
    if isinstance(value, list):
        return [_place(key, item, base) for item in value]
    if not isinstance(value, str):
        return value
    target, separator, name = value.rpartition(":")
    if key == "reward" and separator and target.endswith(".py"):  # a file, never a module
        return f"{(base / Path(target).expanduser()).resolve()}:{name}"
    path = base / Path(value).expanduser()  # an absolute path stays itself
    if key in LOCAL_PATH_SETTINGS or path.exists():
        return str(path.resolve())
    return value


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changes.items()))


def folder_stamp(name_or_path: str) -> float | None:
    """When a local model folder (or file: a GGUF checkpoint) last changed, None for a Hub id: unfinished shards of an
    older model are stale."""
    path = Path(name_or_path)
    if path.is_file():
        return path.stat().st_mtime
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
    output = Path(output_dir)
    partial = output.with_name(f"{output.name}.partial")  # beside it, however the path was spelled (`gen/`)
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
        staged_run_file.write_text(json.dumps(with_working_dir(settings), indent=2, default=str) + "\n")
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
