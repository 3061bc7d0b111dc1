"""fastopt: fused, OpenMP-parallel CPU kernels for training neural networks from NumPy."""
__version__ = "0.1.0"

from ._dispatch import optim as _optim_kernels
from ._config import get_num_threads, set_num_threads, show_config, config

adam_step = _optim_kernels.adam_step
adamw_step = _optim_kernels.adamw_step
rmsprop_step = _optim_kernels.rmsprop_step
sgd_step = _optim_kernels.sgd_step
clip_grad_norm_ = _optim_kernels.clip_grad_norm_

from .optim import SGD, RMSprop, Adam, AdamW, flat_views
from . import lr_scheduler

__all__ = [
    "adam_step", "adamw_step", "rmsprop_step", "sgd_step", "clip_grad_norm_",
    "SGD", "RMSprop", "Adam", "AdamW", "flat_views", "lr_scheduler",
    "get_num_threads", "set_num_threads", "show_config", "config",
]
