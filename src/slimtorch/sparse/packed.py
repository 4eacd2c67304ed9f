"""Whole state dicts in the sparse formats of :mod:`slimtorch.sparse.formats`: each tensor in
its smallest format under ``"<key>::<format>::<part>"`` names, saved as safetensors.

Example:
    >>> w = torch.zeros(16, 16)
    >>> w[:, ::8] = 1.0
    >>> packed = pack_state_dict({"w": w, "w_mask": w != 0})
    >>> sorted(packed)[:2], torch.equal(unpack_state_dict(packed)["w"], w)
    (['w::bitmask::bitmask', 'w::bitmask::shape'], True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from slimtorch.core.io import atomic_write
from slimtorch.prune.storage import checked_items, read_safetensors
from slimtorch.sparse.formats import FORMATS, PARTS, SEP, decode, encode, smallest_format

PACKED_FORMAT = "slimtorch.sparse.packed"  # a key of slimtorch.prune.storage.FILE_FORMATS
PACKED_VERSION = 1


def pack_state_dict(
    state_dict: Mapping[str, torch.Tensor], formats: Sequence[str] = FORMATS
) -> dict[str, torch.Tensor]:
    """Each tensor in its smallest format of ``formats`` (dense ones keep their key).

    Example:
        >>> w = torch.zeros(16, 16)
        >>> w[:, ::8] = 1.0
        >>> sorted(pack_state_dict({"w": w, "b": torch.ones(3)}))
        ['b', 'w::bitmask::bitmask', 'w::bitmask::shape', 'w::bitmask::values']
    """
    if isinstance(formats, str):
        raise ValueError(f"formats must be a list of format names, got the string {formats!r}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in checked_items(state_dict, "packed"):
        fmt = "dense"
        if tensor.dim() and tensor.dtype == torch.bool and "bits" in formats:
            fmt = smallest_format(tensor, ("dense", "bits"))  # masks: never smaller otherwise
        elif tensor.dim() and (tensor.is_floating_point() or tensor.dtype == torch.bool):
            fmt = smallest_format(tensor, ("dense", *[f for f in formats if f != "dense"]))
        if fmt == "dense":
            out[key] = tensor.detach().cpu().contiguous()
            continue
        for part, value in encode(tensor, fmt).items():
            out[f"{key}{SEP}{fmt}{SEP}{part}"] = value
    return out


def unpack_state_dict(packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`, bit-exact, in the original key order.

    Example:
        >>> sd = {"w": torch.eye(8)}
        >>> torch.equal(unpack_state_dict(pack_state_dict(sd))["w"], sd["w"])
        True
    """
    groups: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    order: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for name, value in packed.items():
        key, fmt, part = [*name.split(SEP), "", ""][:3]
        if key not in groups and key not in out:
            order.append(key)
        if not fmt:
            out[key] = value
            continue
        if fmt not in FORMATS or not part:
            raise ValueError(f"packed entry {name!r} is not '<key>::<format>::<part>'")
        groups.setdefault(key, (fmt, {}))[1][part] = value
    for key, (fmt, parts) in groups.items():
        missing = sorted(set(PARTS[fmt]) - set(parts))
        if missing:
            raise ValueError(
                f"packed entry {key!r} ({fmt}) is missing part(s) {missing}; the file is "
                "truncated or was not written by pack_state_dict"
            )
        try:
            out[key] = decode(parts, fmt)
        except ValueError as exc:
            raise ValueError(f"packed entry {key!r} ({fmt}): {exc}") from None
    return {k: out[k] for k in order}


def save_packed(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    formats: Sequence[str] = FORMATS,
) -> Path:
    """Write :func:`pack_state_dict` to a safetensors file, atomically.

    Example:
        >>> save_packed(model.state_dict(), "out/sparse.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    packed = {k: v.clone() for k, v in pack_state_dict(state_dict, formats).items()}
    meta = {"format": PACKED_FORMAT, "version": str(PACKED_VERSION)}
    return atomic_write(path, lambda p: save_file(packed, p, metadata=meta))


def load_packed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_packed` as a dense state dict (CPU).

    Raises:
        ValueError: ``path`` is not a complete safetensors file, is another format (a compact
            file: the message names its loader) or from a newer slimtorch, or an entry in it
            is corrupt (the message names the entry).

    Example:
        >>> model.load_state_dict(load_packed("out/sparse.safetensors"))  # doctest: +SKIP
    """
    tensors = read_safetensors(path, format=PACKED_FORMAT, version=PACKED_VERSION)
    try:
        return unpack_state_dict(tensors)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)!r}: {exc}") from None
