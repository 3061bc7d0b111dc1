"""The other projects' objects that fastopt's pages link to, and where they are.

Intersphinx reads a project's ``objects.inv`` to resolve links such as
``numpy.ndarray``; fetching those files would make the build need the
network and change whenever the projects republish.  Instead this table
lists the objects fastopt's pages and docstrings name, with their addresses
on each project's site, and `write` turns it into inventory files before
the build reads them.  A link to an object missing here fails the build
(``-n``): add its line.  The addresses are those of the sites' stable
versions; the root of each site is in ``conf.py``.
"""
import os
import zlib

# project -> [(name, domain:role, address relative to the site's root)]
# An address ending in "#" gets the name as its anchor.
OBJECTS = {
    "python": [
        ("bool", "py:class", "library/functions.html#"),
        ("int", "py:class", "library/functions.html#"),
        ("float", "py:class", "library/functions.html#"),
        ("object", "py:class", "library/functions.html#"),
        ("callable", "py:function", "library/functions.html#"),
        ("str", "py:class", "library/stdtypes.html#"),
        ("dict", "py:class", "library/stdtypes.html#"),
        ("list", "py:class", "library/stdtypes.html#"),
        ("tuple", "py:class", "library/stdtypes.html#"),
        ("None", "py:data", "library/constants.html#"),
        ("True", "py:data", "library/constants.html#"),
        ("False", "py:data", "library/constants.html#"),
        ("sequence", "std:term", "glossary.html#term-sequence"),
        ("iterable", "std:term", "glossary.html#term-iterable"),
        ("file object", "std:term", "glossary.html#term-file-object"),
        ("TypeError", "py:exception", "library/exceptions.html#"),
        ("ValueError", "py:exception", "library/exceptions.html#"),
        ("IndexError", "py:exception", "library/exceptions.html#"),
        ("ImportError", "py:exception", "library/exceptions.html#"),
        ("RuntimeError", "py:exception", "library/exceptions.html#"),
        ("math.inf", "py:data", "library/math.html#"),
        ("multiprocessing", "py:module", "library/multiprocessing.html#module-multiprocessing"),
    ],
    "numpy": [
        ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html#"),
        ("numpy.dtype", "py:class", "reference/generated/numpy.dtype.html#"),
        ("numpy.float16", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.float32", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.float64", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.int64", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.random.Generator", "py:class", "reference/random/generator.html#"),
        ("numpy.random.SeedSequence", "py:class",
         "reference/random/bit_generators/generated/numpy.random.SeedSequence.html#"),
        ("numpy.random.default_rng", "py:function", "reference/random/generator.html#"),
        ("numpy.savez", "py:function", "reference/generated/numpy.savez.html#"),
        ("numpy.load", "py:function", "reference/generated/numpy.load.html#"),
        ("array_like", "std:term", "glossary.html#term-array_like"),
    ],
    "torch": [
        ("torch.Tensor", "py:class", "tensors.html#"),
        ("torch.optim.Optimizer", "py:class", "optim.html#"),
        ("torch.optim.Adam", "py:class", "generated/torch.optim.Adam.html#"),
        ("torch.optim.AdamW", "py:class", "generated/torch.optim.AdamW.html#"),
        ("torch.optim.SGD", "py:class", "generated/torch.optim.SGD.html#"),
        ("torch.optim.RMSprop", "py:class", "generated/torch.optim.RMSprop.html#"),
    ] + [
        (f"torch.optim.{name}", "py:class", f"generated/torch.optim.{name}.html#")
        for name in ("Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta", "ASGD", "Rprop")
    ] + [
        ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html#"),
        ("torch.nn.BatchNorm1d", "py:class", "generated/torch.nn.BatchNorm1d.html#"),
        ("torch.nn.BatchNorm2d", "py:class", "generated/torch.nn.BatchNorm2d.html#"),
        ("torch.nn.functional.cross_entropy", "py:function",
         "generated/torch.nn.functional.cross_entropy.html#"),
        ("torch.nn.functional.batch_norm", "py:function",
         "generated/torch.nn.functional.batch_norm.html#"),
        ("torch.nn.functional.softmax", "py:function",
         "generated/torch.nn.functional.softmax.html#"),
        ("torch.nn.functional.log_softmax", "py:function",
         "generated/torch.nn.functional.log_softmax.html#"),
        ("torch.nn.utils.clip_grad_norm_", "py:function",
         "generated/torch.nn.utils.clip_grad_norm_.html#"),
        ("torch.nn.utils.clip_grad_value_", "py:function",
         "generated/torch.nn.utils.clip_grad_value_.html#"),
    ] + [
        (f"torch.optim.lr_scheduler.{name}", "py:class",
         f"generated/torch.optim.lr_scheduler.{name}.html#")
        for name in ("LRScheduler", "ExponentialLR", "StepLR", "MultiStepLR", "LambdaLR",
                     "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "LinearLR",
                     "OneCycleLR", "SequentialLR", "ReduceLROnPlateau")
    ],
    "mpi4py": [
        ("mpi4py.MPI.Comm", "py:class", "reference/mpi4py.MPI.Comm.html#"),
        ("mpi4py.MPI.Intracomm", "py:class", "reference/mpi4py.MPI.Intracomm.html#"),
    ],
}


def write(directory):
    """Write ``<project>.inv`` for every project of `OBJECTS` into `directory`."""
    os.makedirs(directory, exist_ok=True)
    for project, objects in OBJECTS.items():
        lines = []
        for name, role, address in objects:
            if address.endswith("#"):
                address += name if role != "std:term" else "term-" + name.replace(" ", "-")
            lines.append(f"{name} {role} 1 {address} -\n")
        header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
                  "# The remainder of this file is compressed using zlib.\n")
        with open(os.path.join(directory, f"{project}.inv"), "wb") as f:
            f.write(header.encode() + zlib.compress("".join(lines).encode()))
