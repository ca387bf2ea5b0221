"""A command's jobs, checked before any of them runs: the overrides expanded into one override list per job (the
command's sweeps and an experiment's `hydra.sweeper.params`, as Hydra's sweeper expands them), each composed with
Hydra's compose API and resolved (bench/config/spec.py). A bad value ends the command with one line naming the valid
choices (`ConfigError`), built from the error's own fields, before anything is written.

    jobs = expand(["cache=dense,h2o", "ctx=8k"], multirun=True)   # [["cache=dense", "ctx=8k"], ["cache=h2o", ...]]
    spec, sweep_dir = compose_job(jobs[0])
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import tempfile
import typing
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from bench.config.schema import CapacityConfig, RunConfig, cache_knobs, register
from bench.config.spec import ConfigError, JobSpec, resolve

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
SCHEMAS = {"config": RunConfig, "capacity": CapacityConfig}  # conf/<name>.yaml -> its schema
register()
# Launchers from optional packages (`pip install "kvbench[launchers]"`): the module each needs, and its package.
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


@contextmanager
def _hydra():
    """Hydra's compose API on conf/ (inside a running Hydra app, its own)."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def expand(overrides: list[str], multirun: bool, config_name: str = "config") -> list[list[str]]:
    """The override list of every job of a command. Raises ConfigError."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(" ".join(str(err).split())) from None
    _check_launchers(parsed)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise ConfigError(f"{sweeps[0]!r} is a sweep: add -m (multirun) to run one job per value")
        return [list(overrides)]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with _hydra():
        try:
            experiment = compose(config_name=config_name, overrides=fixed, return_hydra_config=True).hydra.sweeper
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(one_line(err, SCHEMAS[config_name])) from None
    params = [f"{key}={value}" for key, value in (experiment.get("params") or {}).items()]
    axes: dict[str, list[str]] = {}  # by key: the command's own override of an experiment's axis replaces it
    for o in parser.parse_overrides(params) + parsed:
        key = o.get_key_element()
        axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
    return [list(job) for job in itertools.product(*axes.values())]


def _check_launchers(parsed) -> None:
    for o in parsed:
        name = o.value() if o.get_key_element() == "hydra/launcher" else None
        if name in LAUNCHER_PLUGINS and importlib.util.find_spec(LAUNCHER_PLUGINS[name][0]) is None:
            raise ConfigError(
                f"hydra/launcher={name} needs {LAUNCHER_PLUGINS[name][1]}: pip install 'kvbench[launchers]' "
                "(installed launchers: basic)"
            )


def compose_job(overrides: list[str], config_name: str = "config") -> tuple[JobSpec, Path, object]:
    """(the job's spec, its sweep folder, the composed config). Raises ConfigError."""
    with _hydra():
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(one_line(err, SCHEMAS[config_name])) from None
    return resolve(cfg), Path(cfg.results_dir) / cfg.sweep, cfg


def check(overrides: list[str], multirun: bool) -> list[tuple[str, str, JobSpec]]:
    """Compose and resolve every job of the command; (sweep folder, config hash, spec) per job, in order. Raises
    ConfigError."""
    from bench.results.rows import config_hash

    planned = []
    for job in expand(overrides, multirun):
        spec, sweep_dir, _ = compose_job(job)
        planned.append((str(sweep_dir), config_hash(spec.identity()), spec))
    for sweep_dir in sorted({d for d, _, _ in planned}):
        check_writable(Path(sweep_dir))
    return planned


def check_writable(folder: Path) -> None:
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


def one_line(err: Exception, schema: type = RunConfig) -> str:
    """A composition error in one line naming the valid choices, from the fields Hydra and OmegaConf attach to it
    (`schema`: the config's structured schema)."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, given = err.missing_cfg_file.rsplit("/", 1)
        return f"{group}={given!r} is not valid; valid choices: {', '.join(err.options)}"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        if key.startswith("cache."):
            knobs = ", ".join(["budget", "allocation", "decode", *sorted(cache_knobs())])
            return f"{key} is not a knob of any cache; valid knobs: {knobs}"
        if key.startswith("system."):
            from bench.systems import system_classes

            owners = [
                f"{name}: {', '.join(f.name for f in fields(cls.Knobs))}"
                for name, cls in system_classes().items()
                if fields(cls.Knobs)
            ]
            return f"{key} is not a knob of the chosen system; the systems' knobs: {'; '.join(owners)}"
        return f"{key!r} is not a setting; valid settings: {', '.join(f.name for f in fields(schema))}"
    if isinstance(cause, ValidationError) and key:
        kind = _field_type(key, schema)
        if kind is bool:
            return f"{key}={cause.value} is not valid; valid choices: true, false"
        what = {int: "an integer", float: "a number", str: "a string"}.get(kind, f"of type {kind}")
        return f"{key}={cause.value} is not valid; it must be {what}"
    return " ".join(str(err).split())


def _field_type(key: str, schema: type):
    """The type of the setting at a dotted key (X | None: X)."""
    node = schema
    for part in key.split("."):
        if not is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    args = [a for a in typing.get_args(node) if a is not type(None)]
    return args[0] if args else node
