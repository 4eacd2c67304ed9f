"""Seeding and random-number-generator state that survives a checkpoint.

:func:`get_rng_state` returns only tensors, lists, numbers and strings, so a checkpoint holding it
loads with ``torch.load(..., weights_only=True)``.

Example:
    >>> seed_everything(0)
    >>> state = get_rng_state()
    >>> a = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(a, torch.rand(2))
    True
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, numpy and torch (CPU and every CUDA device).

    Args:
        seed: An integer in ``[0, 2**64)``, the range torch's generator takes.
        deterministic: Also ask torch for deterministic algorithms (cuDNN deterministic, no
            benchmark autotuning, ``torch.use_deterministic_algorithms(True, warn_only=True)``:
            an op without a deterministic kernel warns instead of failing). When ``False`` the
            current settings are left as they are.

    Example:
        >>> seed_everything(123, deterministic=True)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device, lazily
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible results (CUDA >= 10.2).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if not torch.are_deterministic_algorithms_enabled():  # a strict setting stays strict
            torch.use_deterministic_algorithms(True, warn_only=True)
        logger.debug("deterministic algorithms on")


def get_rng_state() -> dict[str, Any]:
    """Capture the torch CPU/CUDA, python and numpy generator states (checkpoint-safe types).

    Example:
        >>> state = get_rng_state()
        >>> sorted(state)
        ['cuda', 'numpy', 'python', 'torch']
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`get_rng_state`.

    CUDA states are restored only when as many CUDA devices are visible as were saved.

    Example:
        >>> set_rng_state(get_rng_state())
    """
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "checkpoint holds %d CUDA generator states but %d devices are visible; "
                "CUDA random streams are not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
