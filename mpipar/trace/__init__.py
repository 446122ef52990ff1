"""mpipar.trace: timing spans, memory samples and crash-safe HDF5 results with provenance.

    Tracer(mesh_or_group)            spans, sample_memory, save (collective)
    ActivationMeter()                live/peak bytes autograd saves for backward
    provenance(mesh_or_group)        root attributes of every results file (collective)
    ResultsWriter(path, name, ...)   resumable sweep table /results/<name>, durable per point
    completed_points(path, name)     keys of the points already stored (for resuming)
    point_key(config)                the stable key of a point (canonical JSON)

The file layout is documented in results/README.md.
"""
from .h5 import PROVENANCE_KEYS, atomic_h5, provenance
from .memory import ActivationMeter, rss_bytes
from .results import ResultsWriter, completed_points, point_key, read_results, write_table
from .table import read_table, table_units
from .tracer import Tracer

__all__ = [
    "Tracer", "ActivationMeter", "provenance", "ResultsWriter", "completed_points", "point_key",
    "read_results", "write_table", "read_table", "table_units", "atomic_h5", "rss_bytes",
    "PROVENANCE_KEYS",
]
