"""slimtorch.sparse: sparse training, sparse storage formats and measured sparse kernels.

- Training: :class:`StaticSparse`, :class:`SET` (Mocanu et al. 2018, arXiv:1707.04780) and
  :class:`RigL` (Evci et al. 2020, arXiv:1911.11134) are Trainer callbacks that keep every layer
  at an exact sparsity (ERK or uniform distribution); :func:`make_sparse_callback` builds one
  from plain arguments.
- Storage: bit-exact BSR and 2:4 encodings beside the bitmask/CSR of :mod:`slimtorch.prune`,
  :func:`smallest_format` and :func:`save_packed`/:func:`load_packed` for whole state dicts.
- Kernels: :func:`sparsify_` swaps a layer for a CSR/BSR/2:4 kernel only where a measurement on
  the device at hand says it is faster with the same outputs; :func:`to_semi_structured_`
  converts 2:4 layers on GPUs that have those kernels; :func:`densify_` undoes both.

Importing this package does not initialise CUDA.

Example:
    >>> from slimtorch.sparse import make_sparse_callback
    >>> make_sparse_callback("rigl", 0.9, delta_t=100).config.sparsity
    0.9
"""

from __future__ import annotations

from slimtorch.sparse._select import select_layers
from slimtorch.sparse.config import SparseTrainingConfig
from slimtorch.sparse.distribution import (
    DISTRIBUTIONS,
    erk_densities,
    exact_nonzeros,
    layer_densities,
    layer_nonzeros,
    random_mask,
    uniform_densities,
)
from slimtorch.sparse.dst import KINDS, SET, RigL, StaticSparse
from slimtorch.sparse.formats import (
    FORMATS,
    decode,
    decode_bsr,
    decode_nm24,
    encode,
    encode_bsr,
    encode_nm24,
    format_nbytes,
    is_2to4,
    smallest_format,
)
from slimtorch.sparse.kernels import (
    KERNEL_FORMATS,
    SparseConv2d,
    SparseLinear,
    build_sparse_layer,
    conv_lowering_skip,
    semi_structured_support,
)
from slimtorch.sparse.make import make_sparse_callback
from slimtorch.sparse.packed import load_packed, pack_state_dict, save_packed, unpack_state_dict
from slimtorch.sparse.report import Candidate, SparsifyReport, SparsifyRow
from slimtorch.sparse.sparsify import densify_, sparsify_, to_semi_structured_
from slimtorch.sparse.updates import cosine_drop_fraction, drop_and_grow, drop_count

__all__ = [
    "DISTRIBUTIONS",
    "FORMATS",
    "KERNEL_FORMATS",
    "KINDS",
    "SET",
    "Candidate",
    "RigL",
    "SparseConv2d",
    "SparseLinear",
    "SparseTrainingConfig",
    "SparsifyReport",
    "SparsifyRow",
    "StaticSparse",
    "build_sparse_layer",
    "conv_lowering_skip",
    "cosine_drop_fraction",
    "decode",
    "decode_bsr",
    "decode_nm24",
    "densify_",
    "drop_and_grow",
    "drop_count",
    "encode",
    "encode_bsr",
    "encode_nm24",
    "erk_densities",
    "exact_nonzeros",
    "format_nbytes",
    "is_2to4",
    "layer_densities",
    "layer_nonzeros",
    "load_packed",
    "make_sparse_callback",
    "pack_state_dict",
    "random_mask",
    "save_packed",
    "select_layers",
    "semi_structured_support",
    "smallest_format",
    "sparsify_",
    "to_semi_structured_",
    "uniform_densities",
    "unpack_state_dict",
]
