"""auditlens benchmarks: accuracy, speed, size and scale, side by side with classical
peers, in one run. Run ``python -m bench --help`` from the repository root.

Importing this package first (as ``python -m bench`` and ``python -m bench.memory`` do)
limits numpy's BLAS to one thread, like the encoder and OpenCV, so that every "1 thread"
in the report holds for numpy's matrix products too (the identify scan, scoring). The
variables must be set before numpy is loaded; the memory children inherit them.
"""

import os
import sys

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

BLAS_SINGLE_THREADED = "numpy" not in sys.modules
"""False when numpy was loaded before the bench (a process that imports the bench as a
library): its BLAS then keeps the threads it started with, and the report says so."""

if BLAS_SINGLE_THREADED:
    for _name in BLAS_THREAD_VARIABLES:
        os.environ[_name] = "1"
