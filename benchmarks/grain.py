"""Where does a second thread start to pay off?  (Measures GRAIN in _optim.pyx.)

Needs a build whose GRAIN is 1, so that the team size is what the thread cap
says at every size, e.g. a scratch copy of the tree:

    cp -r src setup.py pyproject.toml /tmp/g
    (cd /tmp/g && sed -i 's/^DEF GRAIN = .*/DEF GRAIN = 1/' src/fastopt/_optim.pyx &&
     FASTOPT_LEVELS=avx512 python setup.py -q build_ext --inplace)
    PYTHONPATH=/tmp/g/src python benchmarks/grain.py

For Adam (float32 and float64) and SGD-momentum float32 it prints the median
time per call on 1 and 2 threads at sizes around the threshold, interleaving
the two so that machine noise hits both alike.  Other processes busy on the
cores make the 2-thread times much worse (see test_bench_optim.py): measure
on a quiet machine, and repeat.
"""
import sys
import timeit

import numpy as np

import fastopt


def median_time(fn, number, repeat):
    return float(np.median(timeit.repeat(fn, number=number, repeat=repeat))) / number


def adam(n, dtype):
    p, g, m, v = (np.full(n, 0.5, dtype) for _ in range(4))
    return lambda: fastopt.adam_step(p, g, m, v, step=10)


def sgd(n, dtype):
    p, g, b = (np.full(n, 0.5, dtype) for _ in range(3))
    return lambda: fastopt.sgd_step(p, g, b, lr=1e-3, momentum=0.9)


def compare(kernel, dtype, sizes, rounds=15):
    print(f"{kernel.__name__} {np.dtype(dtype).name}: n, 1 thread us, 2 threads us, ratio")
    for n in sizes:
        fn = kernel(n, dtype)
        number = max(10, 2_000_000 // max(n, 1))
        t = {1: [], 2: []}
        for _ in range(rounds):
            for nt in (1, 2):
                fastopt.set_num_threads(nt)
                t[nt].append(median_time(fn, number, 1))
        fastopt.set_num_threads(0)
        t1, t2 = np.median(t[1]) * 1e6, np.median(t[2]) * 1e6
        print(f"  {n:>8} {t1:9.2f} {t2:9.2f} {t1 / t2:6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sizes = [4096, 8192, 16384, 24576, 32768, 49152, 65536, 98304, 131072, 262144]
    compare(adam, np.float32, sizes)
    compare(adam, np.float64, sizes)
    compare(sgd, np.float32, sizes)
