"""CPU feature detection and OpenMP runtime facts (built once, baseline flags)."""

cdef extern from "_cpu.h" nogil:
    int FASTOPT_OPENMP
    int omp_get_max_threads()
    int fastopt_has_avx2()
    int fastopt_has_avx512()
    const char *fastopt_openmp_library()


def cpu_levels():
    """SIMD levels this CPU and OS can run, best first (always ends in 'baseline')."""
    levels = []
    if fastopt_has_avx512():
        levels.append("avx512")
    if fastopt_has_avx2():
        levels.append("avx2")
    levels.append("baseline")
    return levels


def openmp_version():
    """The _OPENMP date (e.g. 201511) the extensions were compiled with; 0 without OpenMP."""
    return FASTOPT_OPENMP


def openmp_library():
    """Path of the OpenMP runtime library in use ('' without OpenMP)."""
    return fastopt_openmp_library().decode("utf-8", "replace")


def max_threads():
    """OpenMP's default team size for the calling thread (honours OMP_NUM_THREADS)."""
    return omp_get_max_threads()
