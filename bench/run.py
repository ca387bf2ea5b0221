"""`python -m bench.run cache=dense,last_recent ctx=8k,32k -m`: one Hydra job = one configuration.

Before Hydra starts, every job of the command is composed and checked (bench/harness/sweep.py): a bad value ends the
command with one line naming the valid choices, exit code 2, and nothing written. Then each job writes one row to
<results_dir>/<sweep>/<config_hash>.parquet, unless that file exists already (resume; force=true reruns). A command
with one of Hydra's other flags (`--help`, `--cfg job`, ...) is Hydra's own business and goes to it unchecked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench.config.spec import ConfigError, resolve
from bench.harness import launch
from bench.harness.sweep import CONF_DIR, check
from bench.scaleout.placement import placement

MULTIRUN = ("-m", "--multirun")
_bar = None


def _sweep_bar(total: int):
    global _bar
    if _bar is None and total > 1:
        from tqdm.auto import tqdm

        _bar = tqdm(total=total, desc="sweep", unit="job", position=0, disable=None)
    return _bar


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    from bench import report
    from bench.results import rows, tables

    spec = resolve(cfg)  # checked before Hydra started: cannot fail here unless called programmatically
    cfg_hash = rows.config_hash(spec.identity())
    sweep_dir = str(Path(cfg.results_dir) / cfg.sweep)
    report.TOUCHED.setdefault(sweep_dir, set()).add(cfg_hash)
    in_order = placement().launcher == "basic"  # other launchers run jobs in other processes
    bar = _sweep_bar(int(os.environ.get("KVBENCH_N_JOBS", "1"))) if in_order else None
    if rows.has_row(sweep_dir, cfg_hash) and not cfg.force:
        row = rows.load(rows.row_path(sweep_dir, cfg_hash)).iloc[0].to_dict()
        print(tables.summary_line(row, skipped=True), flush=True)
    else:
        row = launch.execute(spec, sweep_id=cfg.sweep, config_hash=cfg_hash, isolate=bool(cfg.isolate))
        if row is None:  # its process was killed from outside: no row, so that a rerun redoes it
            print(
                f"[killed] config {cfg_hash}: the job's process was killed; no row written (run the same "
                "command again to redo it)",
                flush=True,
            )
            return {"status": "killed", "config_hash": cfg_hash}
        rows.write_row(sweep_dir, row)
        print(tables.summary_line(row), flush=True)
    if bar is not None:
        bar.update(1)
    return {"status": row["status"], "config_hash": cfg_hash}


def cli(argv: list[str] | None = None) -> None:
    from bench import report
    from bench.results import rows

    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0], *argv]
    flags = [a for a in argv if a.startswith("-")]
    if any(flag not in MULTIRUN for flag in flags):  # --help, --cfg job, ...: Hydra's own
        main()
        return
    try:
        planned = check([a for a in argv if a not in MULTIRUN], multirun=bool(flags))
    except ConfigError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ["KVBENCH_N_JOBS"] = str(len(planned))
    for sweep_dir, cfg_hash, _ in planned:  # the table after a multirun shows these, whichever process ran them
        report.TOUCHED.setdefault(sweep_dir, set()).add(cfg_hash)
    if len(planned) > 1:  # jobs whose task-suite answers one prefill can serve: answered together first
        from bench.eval.quality import answer_together

        answer_together(planned)
    main()
    missing = [h for d, h, _ in planned if not rows.has_row(d, h)]
    if missing:  # a job's process was killed (or the launcher lost it): exit 1, and a rerun redoes exactly these
        print(
            f"kvbench: {len(missing)} of {len(planned)} jobs have no row (their process was killed or lost); "
            "run the same command again to redo them",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
