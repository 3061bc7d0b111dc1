"""fastopt: fused, OpenMP-parallel CPU kernels for training neural networks from NumPy."""
__version__ = "0.1.0"

from ._dispatch import optim as _optim_kernels
from ._dispatch import softmax as _softmax_kernels
from ._config import get_num_threads, set_num_threads, show_config, config

adam_step = _optim_kernels.adam_step
adamw_step = _optim_kernels.adamw_step
rmsprop_step = _optim_kernels.rmsprop_step
sgd_step = _optim_kernels.sgd_step
log_softmax = _softmax_kernels.log_softmax
softmax = _softmax_kernels.softmax
cross_entropy = _softmax_kernels.cross_entropy

__all__ = [
    "adam_step", "adamw_step", "rmsprop_step", "sgd_step",
    "log_softmax", "softmax", "cross_entropy",
    "get_num_threads", "set_num_threads", "show_config", "config",
]
