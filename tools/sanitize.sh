#!/usr/bin/env bash
# Build fastopt with AddressSanitizer + UndefinedBehaviorSanitizer and run the
# test suite under them.  Any sanitizer report aborts the process, so the run
# fails; CI (.ci/run) and developers run exactly this.
#
#   tools/sanitize.sh                        # the whole suite
#   tools/sanitize.sh -x tests/test_fuzz_api.py   # arguments go to pytest
#
# The build goes into a copy of the working tree (FASTOPT_SANITIZE_DIR, or a
# temporary directory removed afterwards), so an in-place release build in the
# tree is left as it is.  SIMD levels: baseline, and avx512 if this CPU has
# it.  Needs the Python given by $PYTHON (default python3) with
# numpy, Cython, setuptools and the test extras, and gcc with libasan/libubsan
# ($CC to use another gcc).
#
# CPython is not built with the sanitizers, so their runtimes are preloaded;
# detect_leaks=0 because CPython does not free everything at exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CC=${CC:-gcc}
export CC

if [ -n "${FASTOPT_SANITIZE_DIR:-}" ]; then
  work=$FASTOPT_SANITIZE_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

# The working tree's files (tracked or new, not ignored), without build products.
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -C "$work" -xf -
else
  (cd "$repo" && tar --exclude=./build --exclude='*.so' -cf - .) | tar -C "$work" -xf -
fi

# The baseline level, plus AVX-512 where the CPU has it (its masked tails
# and wider blocks are the code the baseline build does not run).
levels=baseline
if grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo \
   && grep -qw avx512dq /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then
  levels=baseline,avx512
fi

cd "$work"
echo "sanitizer build (address,undefined; levels $levels) in $work"
FASTOPT_SANITIZE=address,undefined FASTOPT_LEVELS=$levels "$PY" setup.py -q build_ext --inplace

preload="$("$CC" -print-file-name=libasan.so) $("$CC" -print-file-name=libubsan.so)"
for lib in $preload; do
  [ -f "$lib" ] || { echo "sanitize.sh: $lib not found (install gcc's libasan/libubsan)" >&2; exit 2; }
done
export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
env LD_PRELOAD="$preload" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    "$PY" -c "import fastopt; fastopt.show_config(); c = fastopt.config(); assert c['sanitize'], 'not a sanitizer build'; assert c['openmp'], 'built without OpenMP'"
env LD_PRELOAD="$preload" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    "$PY" -m pytest -q -p no:cacheprovider "$@"
