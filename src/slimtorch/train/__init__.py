"""slimtorch.train: the one training loop, its callbacks, checkpoints, AMP and DDP.

Importing this package does not initialise CUDA.

Example:
    >>> from slimtorch.train import Trainer, TrainConfig, EarlyStopping
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(96, 8)
    >>> y = x[:, :4].argmax(dim=1)  # a learnable 4-class task
    >>> train_loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    >>> val_loader = [(x[64:], y[64:])]
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> cfg = TrainConfig(epochs=5, progress=False)
    >>> trainer = Trainer(model, cfg, callbacks=[EarlyStopping()])
    >>> history = trainer.fit(train_loader, val_loader)
    >>> history.epoch  # val_loss kept improving: no early stop
    [1, 2, 3, 4, 5]
    >>> history.val_loss[-1] < history.val_loss[0]
    True
"""

from __future__ import annotations

from slimtorch.train.amp import AmpPlan, resolve_amp
from slimtorch.train.batchnorm import (
    BatchNormRecalibration,
    check_trains_on_one_sample,
    recalibrate_batchnorm_,
)
from slimtorch.train.callbacks import Callback, EarlyStopping
from slimtorch.train.checkpoint import load_checkpoint, save_checkpoint
from slimtorch.train.config import TrainConfig
from slimtorch.train.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers_,
    cleanup,
    data_parallel,
    get_device_index,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    replica_mismatches,
)
from slimtorch.train.history import History
from slimtorch.train.interrupt import TrainingInterrupted
from slimtorch.train.meter import Meter
from slimtorch.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from slimtorch.train.progress import ProgressBar
from slimtorch.train.seeding import get_rng_state, seed_everything, set_rng_state
from slimtorch.train.trainer import Trainer

__all__ = [
    "AmpPlan",
    "BatchNormRecalibration",
    "Callback",
    "EarlyStopping",
    "History",
    "Meter",
    "ProgressBar",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers_",
    "build_optimizer",
    "build_scheduler",
    "check_trains_on_one_sample",
    "cleanup",
    "data_parallel",
    "get_device_index",
    "get_local_rank",
    "get_rank",
    "get_rng_state",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "lr_factor",
    "param_groups",
    "recalibrate_batchnorm_",
    "replica_mismatches",
    "resolve_amp",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
