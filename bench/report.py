"""`python -m bench.report RESULTS`: the comparison table of a results folder, its quality table and its
leaderboard (also written to RESULTS/leaderboard.md): ranked from the per-sample answers where the rows kept them
(bench/results/records.py), with intervals and paired tests (bench/results/stats.py). Also the table printed at the
end of a multirun (`SweepSummary`, a Hydra callback of conf/config.yaml). The tables themselves:
bench/results/tables.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from bench.results import records
from bench.results.rows import load
from bench.results.tables import comparison_table, leaderboard, quality_table, ranked_leaderboard

# Config hashes of the jobs this process ran or skipped, by sweep folder (filled by bench.run).
TOUCHED: dict[str, set[str]] = {}


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print the comparison table of the jobs it ran (or skipped)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = str(Path(config.results_dir) / config.sweep)
        df = load(sweep_dir)
        hashes = TOUCHED.get(sweep_dir)
        if hashes:
            df = df[df["config_hash"].isin(hashes)]
        print(f"\n{len(df)} rows in {sweep_dir}/\n{comparison_table(df)}", flush=True)
        board = ranked_leaderboard(df, records.load(sweep_dir, df)) or leaderboard(df)
        if board:
            Path(sweep_dir, "leaderboard.md").write_text(board + "\n")
            print(f"\n{board}\n(written to {sweep_dir}/leaderboard.md)", flush=True)
        quality = quality_table(df)
        if quality:
            print(f"\nquality:\n{quality}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results folder (searched recursively for *.parquet)")
    args = ap.parse_args(argv)
    if not Path(args.results).exists():
        print(f"bench.report: error: {args.results} does not exist", file=sys.stderr)
        return 2
    df = load(args.results)
    print(comparison_table(df))
    board = ranked_leaderboard(df, records.load(args.results, df)) or leaderboard(df)
    for table in (quality_table(df), board):
        if table:
            print(f"\n{table}")
    if board:
        Path(args.results, "leaderboard.md").write_text(board + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
