"""Extensions and compiler flags.  Everything else lives in pyproject.toml.

Each kernel module (``src/fastopt/_<family>.pyx``) is compiled once per SIMD
level into ``fastopt._<level>._<family>``; ``fastopt._dispatch`` imports the
best level the CPU supports.  Environment variables:

FASTOPT_NATIVE=1     build one level with -march=native instead (not for wheels)
FASTOPT_LEVELS=a,b   build only these levels (baseline is always built)
FASTOPT_DEBUG=1      Cython bounds/wraparound checks on, -O0 -g
"""
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import Cython
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_MODULES = ["_optim", "_batchnorm", "_softmax", "_train"]
SRC = os.path.join("src", "fastopt")
DEBUG = os.environ.get("FASTOPT_DEBUG") == "1"
NATIVE = os.environ.get("FASTOPT_NATIVE") == "1"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")

# Per-level flags on top of the common ones.  -ffp-contract=off keeps the
# elementwise results bit-identical across levels (no FMA contraction).
GCC_LEVELS = {
    "baseline": [],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
}
MSVC_LEVELS = {"baseline": [], "avx2": ["/arch:AVX2"], "avx512": ["/arch:AVX512"]}


def simd_levels():
    if NATIVE:
        return ["native"]
    if not IS_X86:
        return ["baseline"]
    wanted = os.environ.get("FASTOPT_LEVELS")
    levels = list(GCC_LEVELS)
    if wanted:
        levels = [lv for lv in levels if lv == "baseline" or lv in wanted.split(",")]
    return levels


DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    "embedsignature": True,
}


class BuildExt(build_ext):
    """Adds compiler-specific flags, probes OpenMP, records the build config."""

    def build_extensions(self):
        self.force = True   # flags depend on the environment: never reuse stale objects
        ctype = self.compiler.compiler_type
        msvc = ctype == "msvc"
        if msvc:
            common = ["/O2"] if not DEBUG else ["/Od", "/Zi"]
            omp_c, omp_l = ["/openmp"], []
            levels = MSVC_LEVELS
        else:
            # -g0: no debug info, so no build-machine paths in the binaries.
            common = (["-O0", "-g"] if DEBUG else ["-O3", "-g0"]) + [
                "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                "-Wno-unused-function", "-Wno-unreachable-code",
            ]
            if "clang" not in _compiler_version(self.compiler).lower():
                # An optimizer loop with a 16-bit parameter copy touches six
                # arrays (15 pairs); gcc vectorizes a loop behind run-time
                # overlap checks of at most 10 pairs unless told otherwise.
                common.append("--param=vect-max-version-for-alias-checks=32")
            omp_c, omp_l = self._unix_openmp_flags()
            levels = dict(GCC_LEVELS, native=["-march=native"])
        openmp = self._try_openmp(omp_c, omp_l)
        if not openmp:
            warnings.warn(
                "fastopt: the C compiler cannot build OpenMP code; kernels will "
                "run on one thread (fastopt.show_config() reports this).",
                stacklevel=1)
            omp_c, omp_l = [], []
        for ext in self.extensions:
            level = getattr(ext, "simd_level", "baseline")
            ext.extra_compile_args = common + omp_c + levels.get(level, [])
            ext.extra_link_args = omp_l
        self._write_build_config(openmp, common + omp_c, {lv: levels.get(lv, []) for lv in simd_levels()})
        super().build_extensions()

    def copy_extensions_to_source(self):
        # In-place builds: the per-level packages have no source directory.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ext.name.rsplit(".", 1)[0]
            os.makedirs(build_py.get_package_dir(package), exist_ok=True)
        super().copy_extensions_to_source()

    def _unix_openmp_flags(self):
        if sys.platform == "darwin":
            # Apple clang: OpenMP through libomp (Homebrew or a pinned build).
            prefix = os.environ.get("LIBOMP_PREFIX", "/opt/homebrew/opt/libomp")
            return (["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"],
                    [f"-L{prefix}/lib", "-lomp"])
        return ["-fopenmp"], ["-fopenmp"]

    def _try_openmp(self, cflags, lflags):
        code = textwrap.dedent("""\
            #include <omp.h>
            int main(void) { int n = 0;
            #pragma omp parallel reduction(+:n)
              n += 1;
              return n > 0 && omp_get_max_threads() > 0 ? 0 : 1; }
            """)
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "omp_probe.c")
            with open(src, "w") as f:
                f.write(code)
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            self.compiler.link_executable(objs, "omp_probe", output_dir=tmp, extra_postargs=lflags)
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_build_config(self, openmp, cflags, level_flags):
        text = (
            '"""Written by setup.py at build time."""\n'
            f"OPENMP = {openmp!r}\n"
            f"COMPILER = {self.compiler.compiler_type!r}\n"
            f"COMPILER_VERSION = {_compiler_version(self.compiler)!r}\n"
            f"CFLAGS = {cflags!r}\n"
            f"LEVEL_FLAGS = {level_flags!r}\n"
            f"CYTHON_DIRECTIVES = {DIRECTIVES!r}\n"
        )
        targets = [os.path.join(SRC, "_build_config.py")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "fastopt", "_build_config.py"))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


def _compiler_version(compiler):
    cc = getattr(compiler, "compiler", None)
    if not cc:
        return "msvc" if compiler.compiler_type == "msvc" else "unknown"
    import subprocess
    try:
        out = subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else cc[0]
    except Exception:
        return cc[0]


def extensions():
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")]
    incl = [np.get_include(), SRC]
    base = cythonize(
        [Extension(f"fastopt.{m}", [os.path.join(SRC, m + ".pyx")], include_dirs=incl, define_macros=macros)
         for m in KERNEL_MODULES + ["_runtime"]],
        compiler_directives=DIRECTIVES, quiet=True,
        # C generated for one NumPy/Cython pair never meets another's headers.
        build_dir=os.path.join("build", f"cython-{Cython.__version__}-numpy-{np.__version__}"))
    exts = []
    for ext in base:
        family = ext.name.rsplit(".", 1)[1]
        c_src = ext.sources[0]
        if family == "_runtime":
            exts.append(ext)
            continue
        for level in simd_levels():
            # One C file per level so that each gets its own object file.
            dst_dir = os.path.join("build", "simd_src", level)
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, family + ".c")
            shutil.copyfile(c_src, dst)
            e = Extension(f"fastopt._{level}.{family}", [dst], include_dirs=incl, define_macros=macros)
            e.simd_level = level
            exts.append(e)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
