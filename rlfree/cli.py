"""`rlfree <command> [flags]`: a thin layer over the functions in the command registry (`commands.COMMANDS`).

Flags are the dataclass fields of each command (underscore spelling, as in Hugging Face tools); `train` takes every
`TrainingArguments` flag too. `--config recipe.yaml` supplies any of them (see `recipe`).
"""

from __future__ import annotations

import sys

from .commands import COMMANDS, command_function, command_types
from .errors import StageInputError
from .recipe import parse_command, split_config

USAGE = "usage: rlfree <command> [flags]   (rlfree <command> --help for its flags)\n\ncommands:\n" + "".join(
    f"  {name:<10} {command.summary}\n" for name, command in COMMANDS.items()
)


def run_command(command: str, argv: list[str]) -> None:
    """Parse the flags, run the command's function, and print what it reports (once, on the main process)."""
    entry = COMMANDS[command]
    usage = None
    if entry.positional:
        if argv and not argv[0].startswith("-"):
            argv = [entry.positional, *argv]
        usage = f"%(prog)s DIR [flags]   (DIR: the same as {entry.positional} DIR)"
    configs = parse_command(command, command_types(command), argv, usage=usage)
    recipe, _ = split_config(argv)
    if entry.needs_recipe and not recipe:
        raise StageInputError(
            f"`rlfree {command}` needs --config recipe.yaml (a section per stage; see recipes/toy.yaml)"
        )
    result = command_function(command)(*configs, **({"recipe": recipe} if entry.needs_recipe else {}))
    if isinstance(result, str):  # a line to report; commands that print their own tables return their numbers
        from .data import process_state

        if process_state().is_main_process:
            print(result)
    end_process_group()


def end_process_group() -> None:
    """Tear down the process group of a data-parallel run on every rank together. A rank that exits with the group
    alive while another still writes can abort in the gloo backend's threads ("terminate called without an active
    exception", seen once in the two-process diffusion training test)."""
    distributed = sys.modules.get("torch.distributed")  # a command that started no process group imported no torch
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlfree: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        run_command(command, rest)
    except StageInputError as error:
        print(f"rlfree {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
