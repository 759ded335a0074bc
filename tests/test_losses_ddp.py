"""The batch-contrastive loss under DDP (two gloo processes on CPU) sees the global batch.

A tiny model maps inputs to ``u`` (and owns a learnable temperature); its parameter gradients after
DDP's averaging must equal those of one process computing the loss on the whole batch of 8.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmcst.losses import batch_contrastive_ce

BATCH, IN_DIM, DIM = 8, 6, 5
# rows of the batch of 8 each of the two ranks holds: an even split, and an uneven one (a rank that
# skipped unreadable samples holds fewer)
SPLITS = {"even": ([0, 2, 4, 6], [1, 3, 5, 7]), "uneven": ([0, 1, 2, 3, 4], [5, 6, 7])}


class TinyProjector(nn.Module):
    """``u = L2norm(W x + b)`` and a learnable temperature ``1 / exp(logit_scale)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(IN_DIM, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.proj(x), dim=-1), 1.0 / self.logit_scale.exp()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and frozen L2-normalised targets (the CLIP embeddings' stand-in) of the whole batch."""
    generator = torch.Generator().manual_seed(11)
    return torch.randn(BATCH, IN_DIM, generator=generator), F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)


def per_rank_loss(u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """The loss as computed before the global gather: each rank's own B x B matrix only."""
    sim = u @ v.t() / tau
    target = torch.arange(sim.shape[0])
    loss = F.cross_entropy(sim, target)
    return 0.5 * (loss + F.cross_entropy(sim.t(), target)) if symmetric else loss


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    x, v = batch()
    results = {}
    try:
        for split, rows in SPLITS.items():
            mine = torch.tensor(rows[rank])
            for symmetric in (False, True):
                for method in ("gathered", "per_rank"):
                    model = DistributedDataParallel(TinyProjector())
                    u, tau = model(x[mine])
                    if method == "gathered":
                        loss = batch_contrastive_ce(u, v[mine], tau, symmetric)
                    else:
                        loss = per_rank_loss(u, v[mine], tau, symmetric)
                    loss.backward()
                    results[f"{split}-{symmetric}-{method}"] = {"loss": loss.detach(), **gradients(model.module)}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_processes_get_the_gradients_of_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    from engine_helpers import free_port

    assert not dist.is_initialized()  # the reference below is the single-process path
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, v = batch()
    for symmetric in (False, True):
        reference_model = TinyProjector()
        u, tau = reference_model(x)
        reference_loss = batch_contrastive_ce(u, v, tau, symmetric)
        reference_loss.backward()
        reference = gradients(reference_model)
        for split in SPLITS:
            key = f"{split}-{symmetric}"
            for rank in ranks:
                gathered = rank[f"{key}-gathered"]
                # the logged value is the global-batch loss, the same on every rank
                torch.testing.assert_close(gathered.pop("loss"), reference_loss.detach(), msg=key)
                # DDP leaves the same averaged gradients on every rank: those of the whole batch,
                # the projection's and the learnable temperature's alike
                assert gathered.keys() == reference.keys()
                for name, grad in reference.items():
                    torch.testing.assert_close(gathered[name], grad, atol=1e-6, rtol=1e-5, msg=f"{key} {name}")
                # each rank contrasting its own samples only (the defect) gives other gradients
                per_rank = rank[f"{key}-per_rank"]
                assert not torch.allclose(per_rank["proj.weight"], reference["proj.weight"], atol=1e-4), key
