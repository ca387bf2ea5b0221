"""`python -m bench.regress CURRENT --baseline BASELINE [--tolerances F]`: compare a results folder with a committed
baseline (the rules: bench/results/compare.py). Prints a table of what regressed and exits 1; exits 0 when
everything holds, listing what could not be judged. Reads parquet only (no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.results.compare import compare, format_table, latest
from bench.results.rows import load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.regress", description=__doc__.splitlines()[0])
    ap.add_argument("current", help="results folder of this run")
    ap.add_argument("--baseline", required=True, help="committed baseline folder, e.g. results/baselines/ci-cpu")
    ap.add_argument("--tolerances", help="JSON file overriding the default tolerances")
    args = ap.parse_args(argv)
    for path in (args.current, args.baseline):
        if not Path(path).exists():
            print(f"bench.regress: error: {path} does not exist", file=sys.stderr)
            return 2
    tolerances = json.loads(Path(args.tolerances).read_text()) if args.tolerances else None
    current, baseline = load(args.current), load(args.baseline)
    if baseline.empty:
        print(f"bench.regress: error: no rows in the baseline {args.baseline}", file=sys.stderr)
        return 2
    unjudged: list = []
    problems = compare(current, baseline, tolerances, unjudged)
    for config, column in unjudged:
        print(
            f"cannot judge {column} of {config}: timed under heavy contention (bench/measure/contention.py); rerun "
            "on a quiet machine"
        )
    if problems:
        print(f"{len(problems)} regression(s) against {args.baseline}:\n{format_table(problems)}")
        return 1
    judged = "" if not unjudged else f"; {len(unjudged)} timing(s) not judged"
    print(f"no regression: {len(latest(baseline))} baseline configurations matched in {args.current}{judged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
