"""`python -m bench.plot RESULTS_DIR [--out DIR]`: every figure a results folder allows, as PNG files (the figures
themselves, each a function of a DataFrame for notebooks: bench/results/figures.py), accuracies with the error bars
their per-sample answers give. Reads parquet files only (pandas and matplotlib, no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from bench.results import records
from bench.results.figures import save_all
from bench.results.rows import load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description="PNG figures from a results folder")
    ap.add_argument("results", help="a results folder (searched recursively for *.parquet)")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: RESULTS/figures)")
    args = ap.parse_args(argv)
    plt.switch_backend("Agg")  # files, never a window
    if not Path(args.results).exists():
        print(f"bench.plot: error: {args.results} does not exist", file=sys.stderr)
        return 2
    df = load(args.results)
    if df.empty:
        print(f"bench.plot: error: no result rows under {args.results}", file=sys.stderr)
        return 2
    for path in save_all(df, args.out or Path(args.results) / "figures", records.load(args.results, df)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
