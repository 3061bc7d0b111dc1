# cython: emit_code_comments=False
# The kernel core: every family's `noexcept nogil` kernels, compiled once per
# SIMD level into fastopt._<level>._core (setup.py), and nothing else -- no
# argument checks, no Python objects, no state.  fastopt._dispatch imports the
# best level the CPU runs; the fronts (compiled once) call the kernels through
# the table `api` published here (types and layout: _core.pxd).  Only these
# loops gain from AVX2/AVX-512, so only they are built per level.  (Its C
# carries no copy of these sources in comments: it is compiled three times,
# and the .pxi files are where to read it.)
from cpython.pycapsule cimport PyCapsule_New

include "_core_common.pxi"
include "_half.pxi"

cdef CoreAPI table
table.size = sizeof(CoreAPI)

# ------------------------------------------------------------------ train ---
include "_core_train.pxi"

table.train.gather_rows = gather_rows
table.train.ewa_f32 = ewa[float]
table.train.ewa_f64 = ewa[double]

# ------------------------------------------------------------------ optim ---
include "_core_optim.pxi"

table.optim.run_segments = run_segments
table.optim.norm_parts = norm_parts
table.optim.scale = scale_chunks
table.optim.clamp = clamp_chunks
table.optim.widen = widen
table.optim.narrow = narrow
table.optim.factored = factored_step

# -------------------------------------------------------------- batchnorm ---
include "_core_batchnorm.pxi"

table.batchnorm.plan = make_plan
table.batchnorm.run_f32 = bn_run[float]
table.batchnorm.run_f64 = bn_run[double]
table.batchnorm.infer_f32 = infer_coefs[float]
table.batchnorm.infer_f64 = infer_coefs[double]

# ---------------------------------------------------------------- softmax ---
include "_core_softmax.pxi"

table.softmax.run_rows = run_rows
table.softmax.run_cols_f32 = run_cols[float]
table.softmax.run_cols_f64 = run_cols[double]
table.softmax.first_above = first_above
table.softmax.check_classes_f32 = check_classes[float]
table.softmax.check_classes_f64 = check_classes[double]
table.softmax.ordered_sum = ordered_sum
table.softmax.exp_f32 = exp_array[float]
table.softmax.exp_f64 = exp_array[double]
table.softmax.log_f64 = log_array

# ------------------------------------------------------------- the table ---

api = PyCapsule_New(&table, FASTOPT_CORE_CAPSULE, NULL)
