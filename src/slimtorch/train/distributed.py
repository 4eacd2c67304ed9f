"""Distributed data parallel set-up from the ``torchrun`` environment.

``torchrun --nproc_per_node=N script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the process
group (NCCL on CUDA/ROCm, gloo otherwise; ``SLIMTORCH_DIST_BACKEND`` overrides the choice). Every
other function here works, as a single-process no-op, when no process group exists, so the same
script runs with and without ``torchrun``.

``SLIMTORCH_DIST_FORCE=1`` joins a process group and trains data-parallel (DDP wrapper,
all-reduce, sharded loader) even with one process: ``torchrun --nproc_per_node=1`` then runs the
whole NCCL path on one GPU, which shows what DDP itself costs there (the one-GPU side of a
scaling measurement).

Each process uses GPU ``LOCAL_RANK``. With more processes on a host than GPUs, processes share
GPUs round-robin (:func:`get_device_index`); NCCL refuses two ranks on one GPU, so that needs
``SLIMTORCH_DIST_BACKEND=gloo`` (slower all-reduce through host memory: a way to run and test the
data-parallel code path on a one-GPU machine, not a way to speed anything up).

Example:
    >>> init_distributed()          # False outside torchrun
    False
    >>> get_rank(), get_world_size(), is_main_process()
    (0, 1, True)
    >>> cleanup()
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(
            f"environment variable {name}={raw!r} is not an integer; it is set by torchrun, "
            "unset it or launch with `torchrun --nproc_per_node=N`"
        ) from exc


def is_initialized() -> bool:
    """Whether a process group exists.

    Example:
        >>> is_initialized()
        False
    """
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group).

    Example:
        >>> get_rank()
        0
    """
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group).

    Example:
        >>> get_world_size()
        1
    """
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """This process's rank on its host, from ``LOCAL_RANK`` (0 when unset).

    Example:
        >>> get_local_rank()
        0
    """
    return _env_int("LOCAL_RANK", 0)


def get_device_index() -> int:
    """The CUDA/ROCm device this process uses: ``LOCAL_RANK`` modulo the visible GPUs.

    Example:
        >>> get_device_index()  # one process, or one GPU per process
        0
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = get_local_rank()
    return local % count if count > 0 else local


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes files and logs.

    Example:
        >>> is_main_process()  # True in a plain process; guard file writes and logs with it
        True
    """
    return get_rank() == 0


def _forced() -> bool:
    return os.environ.get("SLIMTORCH_DIST_FORCE", "") == "1"


def data_parallel() -> bool:
    """Whether this process trains data-parallel: it is in a process group of more than one
    rank, or of one rank that ``SLIMTORCH_DIST_FORCE=1`` asked for.

    Example:
        >>> data_parallel()
        False
    """
    return is_initialized() and (get_world_size() > 1 or _forced())


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by the ``torchrun`` environment variables.

    Does nothing and returns ``False`` when ``WORLD_SIZE`` is unset or 1 (unless
    ``SLIMTORCH_DIST_FORCE=1`` under torchrun). On CUDA/ROCm it also selects the device
    ``cuda:LOCAL_RANK`` for this process.

    Args:
        backend: ``"nccl"``, ``"gloo"``...; ``None``: ``$SLIMTORCH_DIST_BACKEND`` if set, else
            NCCL when CUDA is available and the build has it (Windows builds do not), else gloo.
        timeout_s: How long collective operations wait for the other ranks.

    Returns:
        Whether training is data-parallel now (:func:`data_parallel`).

    Example:
        >>> init_distributed()  # `python train.py`: one process, no process group
        False

        Under ``torchrun --nproc_per_node=2 train.py`` (needs torchrun, so not run here):

        >>> init_distributed()  # doctest: +SKIP
        True
    """
    if is_initialized():
        return data_parallel()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1 or (world_size == 1 and not (_forced() and "WORLD_SIZE" in os.environ)):
        return False
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} are not set; expected the full "
            "torchrun environment; launch with `torchrun --nproc_per_node=N script.py`"
        )
    if not dist.is_available():
        raise RuntimeError(
            "this PyTorch build has no torch.distributed; install a build with distributed "
            "support or run on one process"
        )
    use_cuda = torch.cuda.is_available()
    if backend is None:
        nccl = use_cuda and dist.is_nccl_available()  # Windows builds have no NCCL: gloo
        backend = os.environ.get("SLIMTORCH_DIST_BACKEND") or ("nccl" if nccl else "gloo")
    if use_cuda and backend == "nccl":
        local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        if local_world > torch.cuda.device_count():
            raise RuntimeError(
                f"{local_world} processes on this host but {torch.cuda.device_count()} GPU(s): "
                "NCCL needs one GPU per process; start fewer processes, or set "
                "SLIMTORCH_DIST_BACKEND=gloo to share GPUs (for testing; slow all-reduce)"
            )
    if use_cuda:
        torch.cuda.set_device(get_device_index())
    dist.init_process_group(
        backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
    )
    logger.info(
        "joined process group: rank %d of %d (local rank %d, backend %s)",
        get_rank(),
        get_world_size(),
        get_local_rank(),
        backend,
    )
    return data_parallel()


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group).

    Example:
        >>> barrier()
    """
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged without a process group).

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if data_parallel():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _fingerprints(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(n, 3)`` float64: sum, sum of squares and a position-weighted sum of each tensor."""
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) % 997 + 1
        rows.append(torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.float64, device=device)
    return torch.stack(rows).to(device)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel as the Trainer runs it: gradients live in DDP's
    all-reduce buckets (no copy in and out every step), and buffers are not synced before
    every forward pass (:func:`broadcast_buffers_` does it once per epoch). torch >= 2.13
    names that ``forward_sync_buffers=False``; older releases ``broadcast_buffers=False``
    (deprecated since, with a warning on every rank)."""
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=ids, gradient_as_bucket_view=True, **no_sync)


def broadcast_buffers_(model: torch.nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s buffers (batch-norm statistics, masks) to every rank, in place.

    The Trainer wraps models in DDP without the per-forward buffer sync (:func:`wrap_ddp`)
    and calls this once per epoch instead: DDP's default broadcasts every buffer before
    every forward pass, which cost 14-20% of resnet56's training throughput on an H100 at
    batch 1024 (world size 1). Under the default, rank 0 only ever sends, so its statistics
    follow its own batches alone; they do here too, so the model rank 0 saves is the same as
    before, and after this copy every rank evaluates with it. Returns the number of buffers
    sent (0 without a process group).

    Example:
        >>> broadcast_buffers_(torch.nn.BatchNorm2d(4))
        0
    """
    if not data_parallel():
        return 0
    count = 0
    for buf in model.buffers():
        dist.broadcast(buf.view(torch.uint8) if buf.dtype == torch.bool else buf, src)
        count += 1
    return count


def replica_mismatches(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers that are not the same on every rank.

    Data-parallel training keeps every replica identical: the same all-reduced gradients go
    through the same optimiser on each rank, mask updates (pruning, RigL/SET) must make the
    same choice everywhere, and the Trainer copies rank 0's buffers (batch-norm statistics) to
    every rank at the end of each epoch (:func:`broadcast_buffers_`). This checks it after the
    fact with one pair of collectives: each rank fingerprints its parameters and buffers and the
    fingerprints' max and min over ranks are compared. Call it where buffers were last synced
    (between epochs): inside an epoch each rank's batch-norm statistics follow its own batches.
    Returns ``[]`` without a process group.

    Example:
        >>> replica_mismatches(torch.nn.Linear(2, 2))
        []
    """
    if not data_parallel():
        return []
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    named += list(model.named_buffers())
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    prints = _fingerprints([t for _, t in named], device)
    high, low = prints.clone(), prints.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    # NaN compares unequal to itself: a NaN on any rank is reported too
    differ = ~(high == low).all(dim=1)
    return [named[i][0] for i in differ.nonzero().flatten().tolist()]


def cleanup() -> None:
    """Wait for every rank, then leave and destroy the process group, if any.

    The barrier keeps a fast rank from tearing its connections down while a slower one is still
    in a collective operation. Called while an exception propagates (from a ``finally``), it
    skips the barrier: the other ranks are in some other collective, so waiting would hang the
    job until its timeout with the error unprinted; leaving makes their collective fail too.

    Example:
        >>> cleanup()
    """
    if is_initialized():
        if sys.exc_info()[0] is None:
            barrier()
        dist.destroy_process_group()


def check_replicas(model: torch.nn.Module) -> list[str]:
    """:func:`replica_mismatches` once training is over (every rank calls it), logged: an error
    naming the tensors when the replicas have diverged."""
    names = replica_mismatches(model)
    if names:
        logger.error(
            "ranks disagree after training on %d tensor(s) (%s%s): the replicas have diverged, "
            "so the saved rank-0 model is only one of them",
            len(names), ", ".join(names[:5]), " ..." if len(names) > 5 else "",
        )  # fmt: skip
    elif is_main_process():
        logger.info("all ranks hold identical parameters and buffers")
    return names
