"""What the benchmark runs: kernel families, sizes, model and array shapes,
hyperparameters.

The other modules read the shape lists through this module at call time
(``settings.MODELS``), so that replacing one here (as the tests do, with
tiny shapes) changes what runs.
"""
from .._cli import UsageError

FAMILIES = {
    # name: (fastopt names it needs, one-line description)
    "adam": (("adam_step",), "Adam step on one array (torch.optim.Adam defaults)"),
    "adamw": (("adamw_step",), "AdamW step on one array (weight_decay=1e-2)"),
    "rmsprop": (("rmsprop_step",), "RMSprop step on one array (torch defaults, lr=1e-2)"),
    "sgd": (("sgd_step",), "SGD momentum=0.9 on one array (course Momentum: dampening=0.9)"),
    "adagrad": (("adagrad_step", "Adagrad"), "Adagrad step on one array (torch defaults)"),
    "adamax": (("adamax_step", "Adamax"), "Adamax step on one array (torch defaults)"),
    "nadam": (("nadam_step", "NAdam"), "NAdam step on one array (torch defaults)"),
    "radam": (("radam_step", "RAdam"), "RAdam step on one array (torch defaults)"),
    "adadelta": (("adadelta_step", "Adadelta"), "Adadelta step on one array (torch defaults)"),
    "asgd": (("asgd_step", "ASGD"), "averaged SGD step on one array (torch defaults)"),
    "rprop": (("rprop_step", "Rprop"), "Rprop step on one array (torch defaults)"),
    "lion": (("lion_step", "Lion"), "Lion step on one array (lr=1e-4, betas=(0.9, 0.99))"),
    "adafactor": (("adafactor_step", "Adafactor"),
                  "Adafactor step on one matrix (torch defaults; factored statistics)"),
    "optimizer": (("Adam",), "fastopt.Adam(params).step(grads) over a model's arrays"),
    "batchnorm": (("batch_norm_forward", "batch_norm_backward"),
                  "BatchNorm training forward + backward"),
    "cross_entropy": (("cross_entropy",), "cross-entropy loss + gradient (int targets, mean)"),
    "log_softmax": (("log_softmax",), "log-softmax over the last axis"),
}
ELEMENTWISE = ("adam", "adamw", "rmsprop", "sgd", "adagrad", "adamax", "nadam", "radam",
               "adadelta", "asgd", "rprop", "lion")

SIZES = (1_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (1_000, 1_000_000)
MAX_SIZE = 100_000_000


def resnet18_shapes():
    """Shapes of ResNet-18's 62 parameter arrays (11,689,512 elements)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and cin != cout:          # downsampling shortcut
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, 512), (1000,)]


# (label, shapes, in --quick)
MODELS = [
    ("ResNet-18, 62 arrays", resnet18_shapes(), True),
    ("500 x 1000", [(1000,)] * 500, True),
    ("10 x 1M", [(1_000_000,)] * 10, False),
]
# Adafactor's matrices: (shape, in --quick)
ADAFACTOR_SHAPES = [((1024, 1024), True), ((4096, 4096), False)]
# (shape, channel axis, in --quick)
BN_SHAPES = [
    ((32, 64, 56, 56), 1, False),
    ((8, 256, 28, 28), 1, True),
    ((256, 512), 1, True),
    ((32, 56, 56, 64), -1, False),
]
# (N, C), in --quick
SOFTMAX_SHAPES = [((64, 50257), True), ((512, 1000), True), ((4096, 10), False)]

# Optimizer hyperparameters: PyTorch's defaults (AdamW's weight decay,
# the course's Momentum beta).
LR_ADAM, BETAS, EPS_ADAM, WD_ADAMW = 1e-3, (0.9, 0.999), 1e-8, 1e-2
LR_RMS, ALPHA, EPS_RMS = 1e-2, 0.99, 1e-8
LR_SGD, MOMENTUM = 1e-2, 0.9
# The other kinds: their declared (torch's; Lion's: optax's) defaults, see
# `cases.OPTIMIZERS`.
EPS_BN = 1e-5


BadInput = UsageError      # a command-line value that cannot be used (exit code 2)
