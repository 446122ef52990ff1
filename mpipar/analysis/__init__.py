"""mpipar.analysis: HDF5 results -> pandas tables, scaling metrics, CSV and PNG figures.

    python -m mpipar.analysis results/scaling/<timestamp> [more files or folders] [--out DIR]

    from mpipar import analysis
    tables = analysis.load(paths)          # {table name: DataFrame}, one row per point
    spans = analysis.load_spans(paths)     # /spans of every file
    analysis.by_arch(tables["train_gpt"])  # [(arch, rows)]: gpt2 and llama runs apart
    analysis.scaling(df, n="tp", time="step_time_s", by=["block"])   # speedup, efficiency
    analysis.fit_alpha_beta(df)            # alpha-beta per collective and group size
    report = analysis.analyze(paths, out_dir)   # CSV + PNG + summary table

Importing this package needs no MPI launcher. The HDF5 schema is in results/README.md.
"""
from .load import by_arch, h5_files, load, load_file, load_memory, load_spans, provenance
from .metrics import bubble_error, fit_alpha_beta, ratio_to, scaling, vs_limit
from .report import analyze, format_summary

__all__ = ["load", "load_file", "load_spans", "load_memory", "provenance", "h5_files", "by_arch", "scaling",
           "vs_limit", "bubble_error", "fit_alpha_beta", "ratio_to", "analyze", "format_summary"]
