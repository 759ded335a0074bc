"""The ``--device`` option and the device helpers shared by the benchmark scripts."""
from __future__ import annotations

import argparse

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def device_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The chosen device (CUDA when available and none is named); a clear error when CUDA is asked for but
    missing. On CUDA, float32 matrix products may use TF32 (as the training engine does)."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU, whose work is done when a call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
