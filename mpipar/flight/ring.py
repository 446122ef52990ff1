"""The flight recorder's hot path in C (ring.c), built on first import, or None.

recorder.begin / begin_p2p / done run on every communication call. In Python
the pair is two frames, two perf_counter calls, a tuple and a few global stores;
the C extension keeps the ring as a fixed array and allocates nothing per call,
at about a quarter of the cost (figures: results/TUNING.md). It is built
like the shared-memory kernels (mpipar.native: this user's private cache,
refused if anyone else can write it), for this Python's ABI. Without a
compiler or Python's headers, or when the build fails, the recorder stays
pure Python: the same records, a little slower. MPIPAR_FLIGHT_C=0 keeps it
pure Python (the tests compare the two).
"""
from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).with_name("ring.c")
MODULE = "mpipar_flight_ring"  # ring.c's PyInit_<name>
FLAGS = ("-O2", "-fPIC", "-shared", "-fwrapv")


def load():
    """The built extension module, or None (no compiler or headers, a failed build, or
    MPIPAR_FLIGHT_C=0). Never raises: the recorder must import."""
    try:
        from .. import native
        from ..settings import current

        if current().flight_c == "0":
            return None
        return native.extension(SOURCE, MODULE, "flight_ring", FLAGS)
    except Exception:  # noqa: BLE001 - a failed build (OSError, SubprocessError, ImportError...): pure Python
        return None
