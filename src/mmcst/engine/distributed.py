"""Devices and processes: device choice, autocast, memory layout, and the ``torchrun`` process group.

Distributed runs are configured from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------
# devices


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available (``cuda:LOCAL_RANK``), else CPU; ``cuda`` without a GPU is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available (use device=auto or device=cpu)")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def memory_format_of(model: Any) -> torch.memory_format:
    """The layout a model asks for its weights and inputs (``LocalizationModel.memory_format``)."""
    return getattr(model, "memory_format", torch.contiguous_format)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp`` (bf16 has fp32's range: no loss scaler); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")



# --------------------------------------------------------------------------------------------------
# distributed


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device_choice: str) -> torch.device:
    """Select the device and, when ``WORLD_SIZE > 1``, join the process group (NCCL on GPU, gloo on CPU).

    The group is created once per process and kept for later calls (``train`` then ``infer`` in one
    ``torchrun`` script): tearing it down and re-creating it races between ranks. It is destroyed at exit.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_choice, local_rank())
    if size <= 1 or dist.is_initialized():
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {missing} are not set: launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    atexit.register(_destroy_process_group)
    return device


# Whether this process flushes subnormal floats everywhere (set by the command line before any torch work).
_FLUSH_FOR_PROCESS = False


def flush_subnormals_for_process() -> bool:
    """Treat subnormal floats (|x| < 1.2e-38) as zero in the whole process; ``mmcst`` commands call it first.

    They take a slow microcode path on x86 CPUs, and SGD on a segmentation network fills its activations with
    them within a few steps: a DeepLab-V2 step on 2 cores went from 0.5 s to 2 s after 5 steps; flushed, it
    stays at 0.5 s. The setting belongs to each thread and torch's intra-op threads copy it when they start,
    so it must come before the first parallel operation. Map files hold float16 values, which are normal
    float32 numbers, so the evaluation of maps is the same with it. Returns whether the CPU supports it.
    """
    global _FLUSH_FOR_PROCESS
    _FLUSH_FOR_PROCESS = bool(torch.set_flush_denormal(True))
    return _FLUSH_FOR_PROCESS


@contextlib.contextmanager
def flush_subnormals(device: torch.device) -> Iterator[None]:
    """Training on a CPU: flush subnormal floats in this thread while the block runs (for callers of the Python
    API; intra-op threads started earlier keep their setting, see :func:`flush_subnormals_for_process`), then
    return to the process's setting."""
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(_FLUSH_FOR_PROCESS)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_flags(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise max of small flags over ranks (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's disjoint share of ``indices`` (every ``world_size``-th element)."""
    return list(indices)[rank()::world_size()]


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over ranks (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    keys = sorted(counts)
    tensor = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: int(v) for k, v in zip(keys, tensor.tolist())}
