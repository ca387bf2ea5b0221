"""Entry point: `python -m bench.run cache=dense,last_recent ctx=8k,32k -m`. One Hydra job = one configuration.

Before Hydra starts, every job of the command is composed and checked (`bench.spec.resolve`): a bad value ends
the command with one line naming the valid choices, exit code 2, and nothing written. Then each job writes one
row to <results_dir>/<sweep>/<config_hash>.parquet, unless that file exists already (resume; force=true reruns).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from bench.config.spec import BenchConfig, ConfigError, resolve
from bench.harness import launch
from bench.scaleout.placement import placement

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
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
    from bench.results import rows as results
    from bench.results import tables

    spec = resolve(cfg)  # validated before Hydra started: cannot fail here unless called programmatically
    cfg_hash = results.config_hash(spec.identity())
    sweep_dir = str(Path(cfg.results_dir) / cfg.sweep)
    report.TOUCHED.setdefault(sweep_dir, set()).add(cfg_hash)
    in_order = placement().launcher == "basic"  # other launchers run jobs in other processes
    bar = _sweep_bar(int(os.environ.get("KVBENCH_N_JOBS", "1"))) if in_order else None
    if results.has_row(sweep_dir, cfg_hash) and not cfg.force:
        row = results.load(results.row_path(sweep_dir, cfg_hash)).iloc[0].to_dict()
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
        results.write_row(sweep_dir, row)
        print(tables.summary_line(row), flush=True)
    if bar is not None:
        bar.update(1)
    return {"status": row["status"], "config_hash": cfg_hash}


# ---- validation before Hydra runs anything ------------------------------------------------------------------------

_HYDRA_FLAGS_WITH_VALUE = {
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--info",
    "-i",
    "--experimental-rerun",
    "-p",
    "--package",
    "--cfg",
    "-c",
}


def _split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, other hydra flags present?)."""
    overrides, multirun, other = [], False, False
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            other = True
            skip = arg in _HYDRA_FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides, multirun, other


def _one_line(err: Exception) -> str:
    """Hydra's composition errors, shortened to one line that names the valid choices."""
    text = str(err).strip()
    cause = str(err.__cause__ or "").strip()
    if "Could not find" in text and "Available options" in text:  # unknown group option, e.g. cache=lru
        group, given = text.split("Could not find '")[1].split("'")[0].rsplit("/", 1)
        listing = text.split("Available options")[1].split("Config search path")[0]
        options = [line.strip() for line in listing.splitlines()[1:] if line.strip()]
        return f"{group}={given!r} is not valid; valid choices: {', '.join(options)}"
    if "not in 'BenchConfig'" in cause:
        key = cause.split("'")[1]
        return f"{key!r} is not a setting; valid settings: {', '.join(f.name for f in fields(BenchConfig))}"
    if "is not a valid bool" in cause:
        return f"{text.removeprefix('Error merging override ')} is not valid; valid choices: true, false"
    if "could not be converted" in cause or "Invalid value" in cause:
        return f"{text.removeprefix('Error merging override ')} is not valid: {cause.splitlines()[0]}"
    return " ".join(text.splitlines()[0].split())


def with_cache_knobs(argv: list[str]) -> list[str]:
    """`cache.sink_tokens=4` -> `++cache.sink_tokens=4`: a knob may be set (or swept) for a cache group whose
    yaml does not list it; bench.spec.resolve then keeps it for the caches that have it."""
    return ["++" + a if re.match(r"^cache\.[A-Za-z_]\w*=", a) else a for a in argv]


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command will run, as Hydra's basic sweeper will expand them."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise ConfigError(f"{sweeps[0]!r} is a sweep: add -m (multirun) to run one job per value")
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True).hydra
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)
    return [job for batch in batches for job in batch]


# Launchers from optional packages (`pip install "kvbench[launchers]"`): the module each needs.
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
}


def _check_launcher(overrides: list[str]) -> None:
    import importlib.util

    for arg in overrides:
        name = arg.split("=", 1)[1] if arg.startswith("hydra/launcher=") else None
        if name in LAUNCHER_PLUGINS and importlib.util.find_spec(LAUNCHER_PLUGINS[name]) is None:
            package = "hydra-joblib-launcher" if name == "joblib" else "hydra-submitit-launcher"
            raise ConfigError(
                f"hydra/launcher={name} needs {package}: pip install 'kvbench[launchers]' (installed launchers: basic)"
            )


def validate(argv: list[str]) -> list[tuple[str, str]]:
    """Compose and resolve every job of the command. Returns (sweep folder, config hash) per job, in order.
    Raises ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.results.rows import config_hash

    overrides, multirun, _ = _split_argv(argv)
    _check_launcher(overrides)
    planned = []
    try:
        jobs = job_overrides(overrides, multirun)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for job in jobs:
                cfg = compose(config_name="config", overrides=job)
                planned.append((str(Path(cfg.results_dir) / cfg.sweep), config_hash(resolve(cfg).identity())))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    for sweep_dir in sorted({d for d, _ in planned}):
        _check_writable(Path(sweep_dir))
    return planned


def _check_writable(folder: Path) -> None:
    """Rows can be written under `folder` (it, or its nearest existing parent, is a writable directory): checked
    before anything runs, so that a sweep does not fail once its first job is done."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = "is not a directory"
    else:
        try:  # access() says yes to root on read-only filesystems: try it (an empty folder, removed at once)
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".kvbench-write-check-"))
        except OSError:
            why = "is not writable"
    if why:
        raise ConfigError(
            f"results_dir: {existing} {why}, so rows cannot be written to {folder}; valid: a folder this user can "
            "write to (results_dir=...)"
        )


def cli(argv: list[str] | None = None) -> None:
    argv = with_cache_knobs(sys.argv[1:] if argv is None else argv)
    # Hydra's argparse wants flags before the overrides: `a=1 -m b=2` would fail on b=2.
    argv = [a for a in argv if a in ("-m", "--multirun")] + [a for a in argv if a not in ("-m", "--multirun")]
    sys.argv = [sys.argv[0], *argv]
    _, _, other_flags = _split_argv(argv)
    if other_flags:  # --help, --cfg job, ...: Hydra's own business
        main()
        return
    from bench import report
    from bench.results import rows as results

    try:
        planned = validate(argv)
    except ConfigError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ["KVBENCH_N_JOBS"] = str(len(planned))
    for sweep_dir, cfg_hash in planned:  # the table after a multirun shows these, whichever process ran them
        report.TOUCHED.setdefault(sweep_dir, set()).add(cfg_hash)
    main()
    missing = [h for d, h in planned if not results.has_row(d, h)]
    if missing:  # a job's process was killed (or the launcher lost it): exit 1, and a rerun redoes exactly these
        print(
            f"kvbench: {len(missing)} of {len(planned)} jobs have no row (their process was killed or lost); "
            "run the same command again to redo them",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
