"""fastopt: fused, OpenMP-parallel CPU kernels for training neural networks from NumPy.

Functional kernels update arrays in place (``adam_step``, ``batch_norm_forward``,
``cross_entropy``...); optimizer objects (``Adam``, ``SGD``...) update a whole
list of parameter arrays in one native call.  ``show_config()`` tells which
SIMD build and OpenMP runtime are in use.
"""
from ._version import __version__ as __version__  # "as": a re-export, for type checkers
from ._config import config, get_num_threads, set_num_threads, show_config
from ._optim import (adadelta_step, adafactor_step, adagrad_step, adam_step, adamax_step,
                     adamw_step, asgd_step, clip_grad_norm_, clip_grad_value_, lion_step,
                     nadam_step, radam_step, rmsprop_step, rprop_step, sgd_step)
from ._batchnorm import BatchNormContext, batch_norm_backward, batch_norm_forward
from ._softmax import cross_entropy, log_softmax, softmax

from . import lr_scheduler
from .amp import GradScaler
from .optim import (ASGD, SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, Lion, NAdam,
                    RAdam, RMSprop, Rprop, flat_views)
from .training import (EWA, bias_corrected, ewa_update, log_uniform, minibatches,
                       sample_beta, take_rows)

__all__ = [
    "adam_step", "adamw_step", "rmsprop_step", "sgd_step", "adagrad_step", "adamax_step",
    "nadam_step", "radam_step", "adadelta_step", "asgd_step", "rprop_step", "lion_step",
    "adafactor_step", "clip_grad_norm_", "clip_grad_value_",
    "SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta",
    "ASGD", "Rprop", "Lion", "Adafactor", "flat_views", "lr_scheduler", "GradScaler",
    "batch_norm_forward", "batch_norm_backward", "BatchNormContext",
    "log_softmax", "softmax", "cross_entropy",
    "minibatches", "take_rows", "ewa_update", "bias_corrected", "EWA",
    "log_uniform", "sample_beta",
    "get_num_threads", "set_num_threads", "show_config", "config",
]

# help() and pickle name the compiled functions by their public name, as
# NumPy does for its own (numpy's set_module); they are defined in the real
# modules fastopt._optim, ._batchnorm, ._softmax and ._train.  (The class
# BatchNormContext is an immutable extension type: its module stays
# fastopt._batchnorm.)
for _f in (adam_step, adamw_step, rmsprop_step, sgd_step, adagrad_step, adamax_step, nadam_step,
           radam_step, adadelta_step, asgd_step, rprop_step, lion_step, adafactor_step,
           clip_grad_norm_, clip_grad_value_,
           batch_norm_forward, batch_norm_backward, cross_entropy, log_softmax, softmax,
           take_rows, ewa_update):
    _f.__module__ = __name__
del _f
