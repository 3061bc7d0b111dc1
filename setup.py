"""Extensions and compiler flags.  Everything else lives in pyproject.toml.

Two layers (see src/fastopt/_core.pxd):

* the kernel core, ``src/fastopt/_core.pyx`` (every family's ``nogil``
  loops), is compiled once per SIMD level into ``fastopt._<level>._core``;
  ``fastopt._dispatch`` imports the best level the CPU supports;
* the fronts (``_optim``, ``_batchnorm``, ``_softmax``, ``_train``: the
  ``def`` API and its checks), ``_runtime`` and ``_tensors`` are compiled
  once, with the baseline flags.

Environment variables:

FASTOPT_NATIVE=1     build one level with -march=native instead (not for wheels)
FASTOPT_LEVELS=a,b   build only these levels (baseline is always built)
FASTOPT_DEBUG=1      Cython bounds/wraparound checks on, -O0 -g
FASTOPT_SANITIZE=address,undefined
                     a sanitizer build (gcc or clang; for testing, never for a
                     wheel): -fsanitize=<list> -fno-sanitize-recover=all
                     -fno-omit-frame-pointer -O1 -g -fno-wrapv (so UBSan also
                     sees signed overflow) instead of -O3 -g0, the sanitizer
                     runtime linked, and the OpenMP probe built with the same
                     flags (so OpenMP stays on).  Only the baseline level unless
                     FASTOPT_LEVELS names more.  Python is not instrumented, so
                     the runtime must be preloaded to import the build:
                     tools/sanitize.sh builds a copy of the tree and runs the
                     tests that way.

Builds use every core (``build_ext -j N`` to choose) and are cached under
build/: the generated C by its inputs, each compiled module by everything
that determines it (see `BuildExt.build_extension`), so building the same
tree again -- a second ``pip install .`` -- compiles nothing, and a change of
compiler, flags, Cython or NumPy never reuses a stale object.
"""
import hashlib
import logging
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

FRONTS = ["_optim", "_batchnorm", "_softmax", "_train"]
BUILT_ONCE = ["_runtime", "_tensors"] + FRONTS
SRC = os.path.join("src", "fastopt")
DEBUG = os.environ.get("FASTOPT_DEBUG") == "1"
NATIVE = os.environ.get("FASTOPT_NATIVE") == "1"
SANITIZE = [s.strip() for s in os.environ.get("FASTOPT_SANITIZE", "").split(",") if s.strip()]
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
log = logging.getLogger("fastopt.setup")

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
    if SANITIZE and not wanted:
        return ["baseline"]
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
    # No embedded signature: functions are bound (Cython 3's default), so
    # inspect/help() read the signature from the function itself; an
    # embedded copy would be shown a second time.
    "embedsignature": False,
}


class BuildExt(build_ext):
    """Adds compiler-specific flags, probes OpenMP, records the build config."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:       # no -j given: compile on every core
            self.parallel = JOBS

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        msvc = ctype == "msvc"
        san_c, san_l = [], []
        if msvc:
            if SANITIZE:
                raise SystemExit("FASTOPT_SANITIZE needs gcc or clang")
            common = ["/O2"] if not DEBUG else ["/Od", "/Zi"]
            omp_c, omp_l = ["/openmp"], []
            levels = MSVC_LEVELS
        else:
            # -g0: no debug info, so no build-machine paths in the binaries.
            opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
            if SANITIZE:
                # Readable reports (frame pointers, line numbers), every report
                # fatal; -fno-wrapv undoes Python's -fwrapv so that signed
                # overflow is checked too.
                flag = "-fsanitize=" + ",".join(SANITIZE)
                opt = ["-O0" if DEBUG else "-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv"]
                san_c = [flag, "-fno-sanitize-recover=all"]
                san_l = [flag]
            common = opt + san_c + [
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
        # The probe is compiled and linked with the same flags as the modules
        # (a sanitizer-instrumented object does not link without the runtime).
        openmp = self._try_openmp(san_c + omp_c, san_l + omp_l)
        if not openmp:
            warnings.warn(
                "fastopt: the C compiler cannot build OpenMP code; kernels will "
                "run on one thread (fastopt.show_config() reports this).",
                stacklevel=1)
            omp_c, omp_l = [], []
        for ext in self.extensions:
            level = getattr(ext, "simd_level", None)
            # The modules built once are Python-facing glue (argument checks,
            # C-API calls): -O2 makes them as fast as -O3 in 3/4 of the
            # compile time.  The kernel core gets -O3 and its level's flags.
            glue = [] if level is not None or DEBUG or SANITIZE or msvc else ["-O2"]
            ext.extra_compile_args = common + omp_c + levels.get(level or "baseline", []) + glue
            ext.extra_link_args = omp_l + san_l
        self._toolchain = _toolchain(self.compiler)
        self._write_build_config(openmp, common + omp_c, {lv: levels.get(lv, []) for lv in simd_levels()})
        super().build_extensions()

    def build_extension(self, ext):
        """Compile and link `ext`, or reuse the module an identical build made.

        The module is kept in build/temp.*/<name>-<key>/, keyed by everything
        that determines it: the C source and the local headers, the
        compiler (command, version, flags), the macros, include directories
        (NumPy's by version) and link options, and the Python it is built
        for.  An identical rebuild copies the stored module; any other
        configuration gets a directory of its own.  ``--force`` rebuilds.
        """
        target = self.get_ext_fullpath(ext.name)
        stored_dir = os.path.join(self.build_temp, f"{ext.name}-{self._ext_key(ext)}")
        stored = os.path.join(stored_dir, os.path.basename(target))
        if self.force or not os.path.exists(stored):
            log.info("building '%s' extension", ext.name)
            objects = self.compiler.compile(
                ext.sources, output_dir=stored_dir, macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=ext.extra_compile_args, depends=ext.depends)
            # Linked under a temporary name: an interrupted build leaves no
            # module that looks complete.
            partial = os.path.join(stored_dir, "partial", os.path.basename(target))
            self.compiler.link_shared_object(
                objects, partial, libraries=self.get_libraries(ext),
                library_dirs=ext.library_dirs, runtime_library_dirs=ext.runtime_library_dirs,
                extra_postargs=ext.extra_link_args, export_symbols=self.get_export_symbols(ext),
                debug=self.debug, build_temp=stored_dir, target_lang="c")
            os.replace(partial, stored)
        else:
            log.info("reusing '%s' from an identical earlier build", ext.name)
        self.mkpath(os.path.dirname(target))
        shutil.copy(stored, target)

    def _ext_key(self, ext):
        numpy_include = np.get_include()
        settings = (
            self._toolchain, self.debug,
            # NumPy's headers by version: the path of a build environment changes.
            [f"numpy-{np.__version__}" if d == numpy_include else d for d in ext.include_dirs],
            ext.define_macros, ext.undef_macros, ext.extra_compile_args, ext.extra_link_args,
            self.get_libraries(ext), ext.library_dirs, ext.runtime_library_dirs,
        )
        headers = sorted(os.path.join(SRC, f) for f in os.listdir(SRC) if f.endswith(".h"))
        return _digest(repr(settings).encode(), *(_read(f) for f in ext.sources + headers))

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
            f"LEVEL_FLAGS: dict[str, list[str]] = {level_flags!r}\n"   # typed: may hold []
            f"SANITIZE: list[str] = {SANITIZE!r}\n"
            f"CYTHON_DIRECTIVES = {DIRECTIVES!r}\n"
        )
        targets = [os.path.join(SRC, "_build_config.py")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "fastopt", "_build_config.py"))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


def _toolchain(compiler):
    """What identifies the compiler, the linker and the target Python."""
    if compiler.compiler_type == "msvc" and not getattr(compiler, "initialized", True):
        compiler.initialize()
    commands = {name: getattr(compiler, name) for name in
                ("compiler_so", "linker_so", "cc", "linker", "compile_options", "ldflags_shared")
                if hasattr(compiler, name)}
    return (compiler.compiler_type, _compiler_version(compiler), sorted(commands.items()),
            sys.version, sysconfig.get_config_var("EXT_SUFFIX"), sysconfig.get_paths()["include"])


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write_if_changed(path, data):
    """Write atomically, and only if the content differs (keeps the mtime)."""
    if os.path.exists(path) and _read(path) == data:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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


def render_templates():
    """Write each Tempita template ``src/fastopt/X.tp`` as ``X`` (the kernel
    variants that exist, from the table in the template; as scikit-learn
    generates its loss kernels).  Written only if changed, so the cache keys
    below see the rendered text."""
    from Cython import Tempita
    for name in sorted(os.listdir(SRC)):
        if name.endswith(".tp"):
            path = os.path.join(SRC, name)
            text = Tempita.sub(_read(path).decode("utf-8"), __name=path)
            _write_if_changed(path[:-len(".tp")], text.encode("utf-8"))


def generated_c(modules):
    """Cythonize `modules` (``_optim``...) once per set of inputs; returns the
    directory that holds the C files (``<dir>/src/fastopt/_optim.c``...).

    The C lives in build/cython-<versions>-<key>/, keyed by the .pyx/.pxi/.pxd
    sources, the Cython and NumPy versions (NumPy's .pxd) and the directives;
    a directory is complete once its marker file exists.  (Cython's own
    timestamp check would regenerate everything in every fresh build
    environment, whose NumPy files are new.)
    """
    render_templates()
    inputs = sorted(f for f in os.listdir(SRC) if f.endswith((".pyx", ".pxi", ".pxd")))
    key = _digest(repr((Cython.__version__, np.__version__, sorted(DIRECTIVES.items()),
                        inputs)).encode(), *(_read(os.path.join(SRC, f)) for f in inputs))
    out = os.path.join("build", f"cython-{Cython.__version__}-numpy-{np.__version__}-{key}")
    done = os.path.join(out, "complete")
    if not (os.path.exists(done) and all(os.path.exists(os.path.join(out, SRC, m + ".c"))
                                         for m in modules)):
        cythonize(
            [Extension(f"fastopt.{m}", [os.path.join(SRC, m + ".pyx")],
                       include_dirs=[np.get_include(), SRC]) for m in modules],
            compiler_directives=DIRECTIVES, quiet=True, build_dir=out, force=True,
            nthreads=JOBS if JOBS > 1 else 0)
        open(done, "w").close()
    return out


def extensions():
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")]
    incl = [np.get_include(), SRC]
    c_dir = generated_c(BUILT_ONCE + ["_core"])
    exts = [Extension(f"fastopt.{m}", [os.path.join(c_dir, SRC, m + ".c")],
                      include_dirs=incl, define_macros=macros) for m in BUILT_ONCE]
    for level in simd_levels():
        # One C file per level, so that each level's object file has its own
        # path and the levels compile side by side.
        dst = os.path.join(c_dir, "simd", level, "_core.c")
        _write_if_changed(dst, _read(os.path.join(c_dir, SRC, "_core.c")))
        e = Extension(f"fastopt._{level}._core", [dst], include_dirs=incl, define_macros=macros)
        e.simd_level = level
        exts.append(e)
    return exts


if __name__ == "__main__":    # not in the processes that cythonize in parallel
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
