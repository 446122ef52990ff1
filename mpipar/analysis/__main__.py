"""`python -m mpipar.analysis RESULTS... [--out DIR]`: CSV, PNG figures and the summary table.

RESULTS are .h5 files or folders (searched recursively). Output goes to --out,
by default the folder of the first RESULTS argument (a study's folder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="HDF5 files or folders")
    p.add_argument("--out", help="output folder (default: next to the first RESULTS)")
    args = p.parse_args(argv)
    from .load import h5_files
    from .report import analyze, format_summary

    first = Path(args.results[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    files = h5_files(args.results)
    if not files:
        print("no .h5 files found", file=sys.stderr)
        return 1
    report = analyze(files, out)
    for name, df in report["tables"].items():
        print(f"{name}: {len(df)} points, {len(df.columns)} columns")
    print(format_summary(report["summary"]))
    print(f"wrote {len(report['csv'])} CSV and {len(report['figures'])} figures to {out}")
    for e in report["errors"]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
