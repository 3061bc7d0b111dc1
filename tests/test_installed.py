"""The installed package: SIMD dispatch, identical results across levels, no
build-machine paths in the binaries, importable without a compiler."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch, _runtime

PKG = pathlib.Path(fastopt.__file__).parent
RUNNABLE = [lv for lv in _dispatch._built_levels() if lv in _runtime.cpu_levels()]


def run_python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_chosen_level_is_supported_and_reported():
    c = fastopt.config()
    assert c["simd_level"] in c["cpu_levels"] + ["native"]
    assert c["simd_level"] in c["built_levels"]
    forced = os.environ.get("FASTOPT_SIMD")
    if forced:
        assert c["simd_level"] == forced
    elif "native" not in c["built_levels"]:
        # without forcing, the best level this CPU runs is used
        assert c["simd_level"] == RUNNABLE[0]


@pytest.mark.parametrize("bad", ["sse9", "avx2 "])
def test_bad_forced_level_is_a_clear_error(bad):
    r = run_python("import fastopt", FASTOPT_SIMD=bad)
    if bad.strip() in RUNNABLE:
        assert r.returncode == 0
    else:
        assert r.returncode != 0 and "FASTOPT_SIMD" in r.stderr


# Each level runs the same computation; results are compared byte for byte.
LEVEL_PROGRAM = r"""
import sys, numpy as np, fastopt
out = {}
for dt in (np.float32, np.float64):
    r = np.random.default_rng(7)
    n = 10_007
    p, g = r.standard_normal(n).astype(dt), r.standard_normal(n).astype(dt)
    for name in ("adam", "amsgrad", "adamw", "rmsprop", "rmsprop_c", "sgd"):
        q = p.copy(); s = [np.zeros_like(p) for _ in range(3)]
        for step in range(1, 6):
            if name == "adam":
                fastopt.adam_step(q, g * step, s[0], s[1], step=step, weight_decay=0.1)
            elif name == "amsgrad":
                fastopt.adam_step(q, g - step, s[0], s[1], step=step, amsgrad=True, max_exp_avg_sq=s[2])
            elif name == "adamw":
                fastopt.adamw_step(q, g * step, s[0], s[1], step=step)
            elif name == "rmsprop":
                fastopt.rmsprop_step(q, g * step, s[0], momentum=0.9, momentum_buffer=s[1])
            elif name == "rmsprop_c":
                fastopt.rmsprop_step(q, g * step, s[0], centered=True, grad_avg=s[2])
            else:
                fastopt.sgd_step(q, g * step, s[0], lr=0.1, momentum=0.9, nesterov=True,
                                 first_step=step == 1)
        out[f"{name}_{np.dtype(dt).name}"] = q
np.savez(sys.argv[1] if len(sys.argv) > 1 else OUT, **out)
"""


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="only one SIMD level can run here")
def test_elementwise_kernels_bit_identical_across_levels(tmp_path):
    results = {}
    for level in RUNNABLE:
        path = tmp_path / f"{level}.npz"
        r = run_python(f"OUT = {str(path)!r}\n" + LEVEL_PROGRAM, FASTOPT_SIMD=level)
        assert r.returncode == 0, r.stderr
        results[level] = dict(np.load(path))
    base = results["baseline"]
    for level, res in results.items():
        for key, arr in res.items():
            assert arr.tobytes() == base[key].tobytes(), f"{key} differs at {level}"


def test_binaries_hold_no_build_paths():
    source_tree = os.environ.get("FASTOPT_SOURCE_TREE")
    if source_tree is None and not (PKG.parent.name == "src"):
        source_tree = str(pathlib.Path(__file__).resolve().parents[1])
    needles = [b"pip-build-env", b"/build/temp."]
    if source_tree and PKG.parent.name != "src":
        needles.append(source_tree.encode())
    binaries = [p for p in PKG.rglob("*") if p.suffix in (".so", ".pyd", ".dylib")]
    assert binaries
    for path in binaries:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{path.name} contains {needle!r}"


def test_import_needs_no_compiler(tmp_path):
    code = ("import numpy as np, fastopt\n"
            "p = np.ones(3, np.float32); m = np.zeros(3, np.float32); v = m.copy()\n"
            "fastopt.adam_step(p, p.copy(), m, v, step=1)\n"
            "print(p[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120,
                       env=dict(os.environ, PATH=str(tmp_path), CC="false", CXX="false",
                                PYTHONPATH=str(PKG.parent)))
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == pytest.approx(0.999, abs=1e-6)


def test_import_fastopt_does_not_import_torch():
    # Only fastopt.torch imports torch (seconds of import time, and optional).
    r = run_python("import sys, fastopt, fastopt.optim, fastopt.lr_scheduler, fastopt.training; "
                   "sys.exit('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
