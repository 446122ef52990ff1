"""python -m mpipar.flight [DIR]: the verdict on the flight records in DIR (default $MPIPAR_FLIGHT_DIR
or mpipar-flight). Exit status 0 when the records agree, 1 when they show a divergence, 2 when
there are none."""
from __future__ import annotations

import argparse
import sys

from ..settings import current as settings
from .verdict import analyse, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipar.flight", description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", default=None, help="folder of rank<R>.json records")
    args = parser.parse_args(argv)
    directory = args.directory or settings().flight_dir
    records = load(directory)
    if not records:
        print(f"no flight records (rank<R>.json) in {directory}", file=sys.stderr)
        return 2
    verdict = analyse(records)
    print(verdict)
    return 0 if verdict.agree else 1


if __name__ == "__main__":
    sys.exit(main())
