"""fastopt: fused, OpenMP-parallel CPU kernels for training neural networks from NumPy."""
__version__ = "0.1.0"

from ._dispatch import optim as _optim_kernels
from ._config import get_num_threads, set_num_threads, show_config, config
from .training import (EWA, bias_corrected, ewa_update, log_uniform, minibatches,
                       sample_beta, take_rows)

adam_step = _optim_kernels.adam_step
adamw_step = _optim_kernels.adamw_step
rmsprop_step = _optim_kernels.rmsprop_step
sgd_step = _optim_kernels.sgd_step

__all__ = [
    "adam_step", "adamw_step", "rmsprop_step", "sgd_step",
    "minibatches", "take_rows", "ewa_update", "bias_corrected", "EWA",
    "log_uniform", "sample_beta",
    "get_num_threads", "set_num_threads", "show_config", "config",
]
