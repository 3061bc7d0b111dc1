"""fastopt: fused, OpenMP-parallel CPU kernels for training neural networks from NumPy."""
__version__ = "0.1.0"

from ._dispatch import optim as _optim_kernels
from ._dispatch import batchnorm as _batchnorm_kernels
from ._config import get_num_threads, set_num_threads, show_config, config

adam_step = _optim_kernels.adam_step
adamw_step = _optim_kernels.adamw_step
rmsprop_step = _optim_kernels.rmsprop_step
sgd_step = _optim_kernels.sgd_step
batch_norm_forward = _batchnorm_kernels.batch_norm_forward
batch_norm_backward = _batchnorm_kernels.batch_norm_backward
BatchNormContext = _batchnorm_kernels.BatchNormContext

__all__ = [
    "adam_step", "adamw_step", "rmsprop_step", "sgd_step",
    "batch_norm_forward", "batch_norm_backward", "BatchNormContext",
    "get_num_threads", "set_num_threads", "show_config", "config",
]
