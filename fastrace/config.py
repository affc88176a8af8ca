"""TOML experiment files: ``fastrace run EXPERIMENT.toml -o OUT.h5``.

An experiment names a task (a builder from ``fastrace.tasks`` with its arguments), an
initialisation with one run per seed, the training settings of ``fastrace.simulate`` and,
optionally, the reduced theory to integrate into the same file::

    [task]                 # the network and data
    name = "routing"
    M = 7
    K = 4
    hidden = 64

    [init]
    kind = "orthogonal"    # "orthogonal" (gain), "gaussian" (std) or "aligned" (b0)
    gain = 0.2
    seeds = [0, 1, 2]      # one run per seed, all in one batched simulate call

    [train]                # keyword arguments of fastrace.simulate
    method = "gd"          # or "flow" (with lr and steps, or t_end)
    lr = 0.02
    steps = 500
    record_every = 1
    save_weights = false
    checkpoint_every = 100

    [theory]               # optional: the reduced system, run "theory" in the same file
    b0 = 0.08

Train settings that would do nothing are named in a warning (they are taken, and ignored):
``rtol``, ``atol`` and ``max_steps`` are for method "flow" (its integrator), and
``weights_dtype = "float32"`` is the type of the weight snapshots (``save_weights = true``).
A warning, not an error: a sweep over ``train.method`` or ``train.save_weights`` has such
settings at some of its points, and files written before kept them.
``n_records`` is refused for a run given by ``lr`` and ``steps`` (its save points are every
``record_every`` steps).

Seeds: run ``seed_SS`` draws its initial weights from ``numpy.random.default_rng(s)``. With
``init.seed_sequence = {entropy = E, spawn_key = [k]}`` (what a sweep writes into each point) it
draws them from ``SeedSequence(E, spawn_key=(k, s))``, the s-th child of the point's sequence.

A sweep file adds a ``[sweep]`` table of lists over dotted keys (``"init.gain" = [0.2, 1.0]`` or
``init.gain = [...]``) and an optional integer ``seed``; see ``fastrace.sweep``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import re
import time
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, StoreError
from .simulate import _MAX_SAVE_POINTS, _MAX_STEPS, _MIN_RTOL, DIVERGED

TASKS = ("routing",)  # builders of fastrace.tasks that experiment files may name
INIT_KINDS = {"orthogonal": "gain", "gaussian": "std", "aligned": "b0"}
THEORY_METHODS = ("gd", "dopri5", "rosenbrock")

# key -> (check, default). Checks: "pos_float", "threshold" (positive, or inf), "pos_int",
# "nonneg_float", "unit_float", "bool", "float", or a tuple of allowed strings. Keys without
# a default are optional and left to simulate's defaults when absent.
_TRAIN = {
    "method": (("gd", "flow"), "gd"),
    "lr": ("pos_float", None),
    "steps": ("pos_int", None),
    "t_end": ("pos_float", None),
    "record_every": ("pos_int", None),
    "n_records": ("pos_int", None),
    "save_weights": ("bool", None),
    "weights_dtype": (("float64", "float32"), None),
    "checkpoint_every": ("pos_int", None),
    "momentum": ("unit_float", None),
    "weight_decay": ("nonneg_float", None),
    "engine": (("auto", "moments", "samples"), None),
    "svals": ("bool", None),
    "rtol": ("pos_float", None),
    "atol": ("pos_float", None),
    "max_steps": ("pos_int", None),
    "divergence_threshold": ("threshold", None),
}
_THEORY = {
    "b0": ("float", None),
    "method": (THEORY_METHODS, None),
    "tol": ("pos_float", None),
    "rtol": ("pos_float", None),
    "atol": ("pos_float", None),
}


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file.

    ``task`` {"name": builder, **arguments}; ``init`` {"kind", "gain" | "std" | "b0", "seeds",
    optional "seed_sequence"}; ``train`` keyword arguments of ``simulate``; ``theory`` None or
    {"b0", optional "method", "tol", "rtol", "atol"}; ``sweep`` {dotted key: values} (empty for a
    plain experiment) with ``sweep_seed``; ``text`` the TOML text (stored in the output file).
    """

    task: dict[str, Any]
    init: dict[str, Any]
    train: dict[str, Any]
    theory: dict[str, Any] | None
    sweep: dict[str, list] = field(default_factory=dict)
    sweep_seed: int = 0
    text: str = ""

    @property
    def table(self) -> dict[str, Any]:
        """The experiment as a TOML-shaped dict (without the sweep)."""
        table = {"task": dict(self.task), "init": dict(self.init), "train": dict(self.train)}
        if self.theory is not None:
            table["theory"] = dict(self.theory)
        return copy.deepcopy(table)

    @property
    def run_names(self) -> list[str]:
        return [f"seed_{s:02d}" for s in self.init["seeds"]]

    def with_values(self, values: Mapping[str, Any]) -> Experiment:
        """A copy with dotted keys replaced (``{"init.gain": 1.0}``), validated again, without
        the sweep; its ``text`` is the new TOML. A value of None removes the key."""
        table = self.table
        for key, value in values.items():
            section, _, name = str(key).partition(".")
            if section not in ("task", "init", "train", "theory") or not name or "." in name:
                raise ConfigError(f"{key!r}: sweep keys are 'section.key' with section one of "
                                  "task, init, train, theory")
            target = table.setdefault(section, {})
            if value is None:
                target.pop(name, None)
            else:
                target[name] = copy.deepcopy(value)
        return experiment_from_table(table, dumps(table))

    def to_toml(self) -> str:
        """The experiment (with its sweep, if any) as TOML text."""
        table = self.table
        if self.sweep:
            table["sweep"] = {**{k: list(v) for k, v in self.sweep.items()},
                              "seed": self.sweep_seed}
        return dumps(table)


# ============================================================================ loading
def load_experiment(source: str | os.PathLike) -> Experiment:
    """Read and validate an experiment from a TOML file path or from TOML text.

    A ``str`` is taken as a path when such a file exists, else as TOML text when it looks like
    TOML (has a newline or '='). Raises ConfigError naming the offending key.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                            and "=" not in source):
        path = Path(os.fspath(source))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read experiment file {path}: {exc.strerror or exc}") from None
        where = str(path)
    elif isinstance(source, str):
        text, where = source, "experiment text"
    else:
        raise ConfigError(f"an experiment is a TOML file path or TOML text, got "
                          f"{type(source).__name__}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    return experiment_from_table(table, text)


def experiment_from_table(table: Mapping[str, Any], text: str | None = None) -> Experiment:
    """Validate a TOML-shaped dict into an Experiment (``text`` defaults to its TOML dump)."""
    if not isinstance(table, Mapping):
        raise ConfigError("an experiment is a table of sections")
    unknown = set(table) - {"task", "init", "train", "theory", "sweep"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; sections are task, init, "
                          "train, theory (optional) and sweep (sweep files)")
    for section in ("task", "init", "train"):
        if section not in table:
            raise ConfigError(f"missing section [{section}]")
    for section, value in table.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{section} must be a table ([{section}]), got {value!r}")
    task = _check_task(table["task"])
    init = _check_init(table["init"])
    train = _check_section("train", table["train"], _TRAIN)
    _check_train_combination(train)
    theory = None
    if "theory" in table:
        theory = _check_section("theory", table["theory"], _THEORY)
        if "b0" not in theory:
            raise ConfigError("theory.b0 is missing: the initial mode strength of the theory")
        if theory.get("method") == "gd" and train["method"] != "gd":
            raise ConfigError("theory.method = 'gd' needs train.method = 'gd' (with lr and steps)")
    sweep, sweep_seed = _check_sweep(table.get("sweep", {}))
    plain = {"task": task, "init": init, "train": train}
    if theory is not None:
        plain["theory"] = theory
    return Experiment(task=task, init=init, train=train, theory=theory, sweep=sweep,
                      sweep_seed=sweep_seed, text=dumps(plain) if text is None else text)


def _check_task(section: Mapping[str, Any]) -> dict[str, Any]:
    from . import tasks

    name = section.get("name")
    if name not in TASKS:
        raise ConfigError(f"task.name must be one of {list(TASKS)}, got {name!r}")
    params = inspect.signature(getattr(tasks, name)).parameters
    out: dict[str, Any] = {"name": name}
    for key, value in section.items():
        if key == "name":
            continue
        if key not in params:
            raise ConfigError(f"task.{key}: unknown key; task {name!r} takes "
                              f"{', '.join(params)}")
        out[key] = value
    return out


def _check_init(section: Mapping[str, Any]) -> dict[str, Any]:
    kind = section.get("kind")
    if kind not in INIT_KINDS:
        raise ConfigError(f"init.kind must be one of {list(INIT_KINDS)}, got {kind!r}")
    scale = INIT_KINDS[kind]
    allowed = {"kind", scale, "seeds", "seed_sequence"}
    for key in section:
        if key not in allowed:
            raise ConfigError(f"init.{key}: unknown key for kind {kind!r}; keys are "
                              f"{', '.join(sorted(allowed))}")
    out: dict[str, Any] = {"kind": kind}
    if scale == "b0":
        if "b0" not in section:
            raise ConfigError("init.b0 is missing: kind 'aligned' needs the initial mode strength")
        out["b0"] = _check_value("init.b0", section["b0"], "float")
    else:
        out[scale] = _check_value(f"init.{scale}", section.get(scale, 1.0), "nonneg_float")
    seeds = section.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"init.seeds must be a non-empty list of non-negative integers, "
                          f"got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"init.seeds must be distinct, got {seeds}")
    out["seeds"] = list(seeds)
    if "seed_sequence" in section:
        ss = section["seed_sequence"]
        ok = (isinstance(ss, Mapping) and set(ss) == {"entropy", "spawn_key"}
              and isinstance(ss["entropy"], int) and ss["entropy"] >= 0
              and isinstance(ss["spawn_key"], list)
              and all(isinstance(k, int) and k >= 0 for k in ss["spawn_key"]))
        if not ok:
            raise ConfigError("init.seed_sequence must be {entropy = <int >= 0>, spawn_key = "
                              f"[<ints >= 0>]}}, got {ss!r}")
        out["seed_sequence"] = {"entropy": ss["entropy"], "spawn_key": list(ss["spawn_key"])}
    return out


def _check_section(name: str, section: Mapping[str, Any], schema: Mapping[str, tuple]
                   ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in schema:
            raise ConfigError(f"{name}.{key}: unknown key; keys are {', '.join(schema)}")
        out[key] = _check_value(f"{name}.{key}", value, schema[key][0])
    for key, (_, default) in schema.items():
        if default is not None:
            out.setdefault(key, default)
    return out


def _check_value(key: str, value: Any, check: Any) -> Any:
    if isinstance(check, tuple):
        if value not in check:
            raise ConfigError(f"{key} must be one of {list(check)}, got {value!r}")
        return value
    if check == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if check == "pos_int":
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        return value
    x = float(value)
    if check == "threshold" and x == math.inf:  # (only non-finite values count, as simulate)
        return x
    if not math.isfinite(x):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if check in ("pos_float", "threshold") and not x > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    if check == "nonneg_float" and x < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if check == "unit_float" and not 0 <= x < 1:
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
    return x


def _check_train_combination(train: dict[str, Any]) -> None:
    """The checks simulate makes of its settings, made here in the words of the file (simulate
    names its own keywords, some of which a file cannot hold) and before any compute (the
    theory is integrated before simulate is called). Settings simulate would take and ignore
    are named in a warning (see the module docstring)."""
    has_lr, has_steps, has_t = "lr" in train, "steps" in train, "t_end" in train
    if train["method"] == "gd":
        if not (has_lr and has_steps):
            raise ConfigError(f"train.{'lr' if not has_lr else 'steps'} is missing: method 'gd' "
                              "needs lr and steps")
        if has_t:
            raise ConfigError("train.t_end is for method 'flow'; gradient descent runs `steps` "
                              "steps")
        for key in ("rtol", "atol", "max_steps"):
            if key in train:
                warnings.warn(f"train.{key} is a setting of the integrator of method 'flow'; "
                              "method 'gd' has none: it is ignored", stacklevel=4)
    else:
        if has_lr != has_steps or (has_lr and has_t) or not (has_lr or has_t):
            raise ConfigError("train: method 'flow' needs t_end, or lr and steps (t_end = "
                              "lr * steps), not both")
        if has_t and "record_every" in train:
            raise ConfigError("train.record_every counts steps; a flow run given by t_end "
                              "saves n_records evenly spaced times")
        if "momentum" in train:
            raise ConfigError("train.momentum is for method 'gd'")
        if "rtol" in train and train["rtol"] < _MIN_RTOL:
            raise ConfigError(f"train.rtol = {train['rtol']:g} is below what float64 can "
                              f"deliver; use at least {_MIN_RTOL:.1e}")
        if "rtol" in train and train["rtol"] >= 1.0:
            raise ConfigError(f"train.rtol = {train['rtol']:g} lets each step's error be as "
                              "large as the weights themselves; use rtol < 1")
    if has_steps:
        steps, every = train["steps"], train.get("record_every", 1)
        if steps > _MAX_STEPS:
            raise ConfigError(f"train.steps must be at most 2**53 (t = lr * step must count "
                              f"every step), got {steps}")
        if not math.isfinite(train["lr"] * steps):
            raise ConfigError(f"train.lr * train.steps overflows (lr = {train['lr']:g}, "
                              f"steps = {steps})")
        if steps // every > _MAX_SAVE_POINTS:
            raise ConfigError(f"train.steps = {steps} with train.record_every = {every} makes "
                              f"more than {_MAX_SAVE_POINTS} save points; set a larger "
                              "train.record_every")
    if "n_records" in train:
        if has_steps:
            raise ConfigError("train.n_records is for method 'flow' given by t_end; with lr and "
                              "steps the save points are every train.record_every steps (and "
                              "the last step)")
        if not 2 <= train["n_records"] <= _MAX_SAVE_POINTS:
            raise ConfigError(f"train.n_records must be at least 2 and at most "
                              f"{_MAX_SAVE_POINTS}, got {train['n_records']}")
    if train.get("weights_dtype") == "float32":
        if not train.get("save_weights", False):
            warnings.warn('train.weights_dtype = "float32" is the type of the weight snapshots, '
                          "which only train.save_weights = true records: it is ignored",
                          stacklevel=4)
        largest = float(np.finfo(np.float32).max)
        if train.get("divergence_threshold", 0.0) > largest:
            raise ConfigError(f'train.weights_dtype = "float32" snapshots hold weights up to '
                              f"{largest:.3g}: set train.divergence_threshold at most that "
                              f"(got {train['divergence_threshold']:g}), or keep float64 "
                              "snapshots")


def _check_sweep(section: Mapping[str, Any]) -> tuple[dict[str, list], int]:
    grid: dict[str, list] = {}
    seed = 0

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(dotted, value)
            elif isinstance(value, list):
                if not value:
                    raise ConfigError(f"sweep.{dotted}: the list of values is empty")
                section, _, name = dotted.partition(".")
                if section not in ("task", "init", "train", "theory") or not name \
                        or "." in name:
                    raise ConfigError(f"sweep.{dotted}: sweep keys are 'section.key' with "
                                      "section one of task, init, train, theory")
                grid[dotted] = list(value)
            else:
                raise ConfigError(f"sweep.{dotted} must be a list of values, got {value!r}")

    rest = dict(section)
    if "seed" in rest:
        seed = rest.pop("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"sweep.seed must be a non-negative integer, got {seed!r}")
    walk("", rest)
    return grid, seed


# ============================================================================ TOML text
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def dumps(table: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of a table of sections of plain values (what experiment files hold)."""
    parts = []
    for section, body in table.items():
        lines = [f"[{_toml_key(section)}]"]
        lines += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in body.items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


# ============================================================================ running
def build_task(exp: Experiment) -> Any:
    """The task object (``.network``, ``.data``, ...) the experiment names."""
    from . import tasks

    kwargs = {k: v for k, v in exp.task.items() if k != "name"}
    for key in ("items", "targets"):
        if key in kwargs:
            kwargs[key] = np.asarray(kwargs[key], dtype=np.float64)
    try:
        return getattr(tasks, exp.task["name"])(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"task: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"task {exp.task['name']!r}: {exc}") from None


def run_generators(exp: Experiment) -> list[np.random.Generator]:
    """One generator per run (per entry of ``init.seeds``); see the module docstring."""
    ss = exp.init.get("seed_sequence")
    if ss is None:
        return [np.random.default_rng(s) for s in exp.init["seeds"]]
    return [np.random.default_rng(np.random.SeedSequence(
        ss["entropy"], spawn_key=(*ss["spawn_key"], s))) for s in exp.init["seeds"]]


def initial_weights(exp: Experiment, task: Any, reduction: Any = None) -> list[dict[str, np.ndarray]]:
    """The initial weights of every run ({edge: (out, in)} per seed)."""
    from . import init

    kind = exp.init["kind"]
    rngs = run_generators(exp)
    if kind == "orthogonal":
        return [init.orthogonal(task.network, exp.init["gain"], seed=g) for g in rngs]
    if kind == "gaussian":
        return [init.gaussian(task.network, exp.init["std"], seed=g) for g in rngs]
    return [reduction.aligned_init(exp.init["b0"], seed=g) for g in rngs]


def _save_points(train: Mapping[str, Any]) -> tuple[str, Any]:
    """Theory save points matching the simulation's: ("steps", indices) or ("times", t)."""
    if "steps" in train:
        steps, every = int(train["steps"]), int(train.get("record_every", 1))
        grid = np.arange(0, steps + 1, every, dtype=np.int64)
        if grid[-1] != steps:  # the last step is always saved
            grid = np.append(grid, np.int64(steps))
        return "steps", grid
    return "times", np.linspace(0.0, float(train["t_end"]), int(train.get("n_records", 101)))


def _n_save_points(train: Mapping[str, Any]) -> int:
    """The number of save points of ``_save_points(train)``, without making them."""
    if "steps" in train:
        steps, every = int(train["steps"]), int(train.get("record_every", 1))
        return steps // every + 1 + (steps % every != 0)
    return int(train.get("n_records", 101))


def _check_theory_memory(exp: Experiment, reduction: Any) -> None:
    """ConfigError if the theory's rows (it is held in memory, the runs' rows are not) would
    not fit in the memory available now."""
    from ._memory import refuse_if_no_room as _refuse_if_no_room

    system = reduction.system
    # per save point: the schedule (steps, times), t, loss, b, the modes' losses (made twice)
    # and path strengths, in float64
    row = 8 * (6 + reduction.n_modes * (system.n_edges + system.n_paths + 2))
    what = "fewer train.n_records" if "t_end" in exp.train else "a larger train.record_every"
    _refuse_if_no_room(_n_save_points(exp.train) * row, f"save fewer points ({what})",
                       "the theory's rows (held in memory)")


def integrate_theory(exp: Experiment, reduction: Any, threads: int | None = None) -> Any:
    """The reduced theory on the simulation's time axis (a ReducedSolution)."""
    th, train = exp.theory or {}, exp.train
    method = th.get("method", "gd" if train["method"] == "gd" else "dopri5")
    options = {k: th[k] for k in ("rtol", "atol") if k in th and method != "gd"}
    kind, points = _save_points(train)
    if method == "gd":
        return reduction.integrate(th["b0"], method="gd", lr=train["lr"], steps=train["steps"],
                                   save_at=points, threads=threads)
    times = points * train["lr"] if kind == "steps" else points
    return reduction.integrate(th["b0"], method=method, t_end=float(times[-1]), save_at=times,
                               threads=threads, **options)


def same_experiment(stored: str, exp: Experiment) -> bool:
    """Whether the experiment text ``stored`` (a file's root ``config``) is ``exp``, both as
    validated (an Experiment built in Python may hold settings in another form); ConfigError
    if that text is not an experiment this fastrace reads."""
    try:
        with warnings.catch_warnings():  # (said when the file was loaded)
            warnings.simplefilter("ignore")
            other = experiment_from_table(tomllib.loads(stored))
            mine = experiment_from_table(exp.table)
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise ConfigError(f"the experiment it was written by cannot be read ({exc})") from exc
    return other.table == mine.table


def _add_theory(out: Path, solution: Any) -> None:
    """Add the theory run to the finished simulation file ``out``, atomically.

    The file with the theory is built beside it, under ``<out>.partial`` (as the store's writer
    builds a file): a copy of ``out`` into which the theory run, written first to
    ``<out>.theory.partial``, is copied; it gets a root ``file_id`` of its own (it is another
    file), is synced to disk and renamed onto ``out``. A kill at any moment leaves ``out`` as
    the simulation wrote it (every run intact; ``--resume`` adds the theory) or complete with
    its theory. A failure (a full disk, say) is a StoreError naming ``out``, which is left as
    it was; the temporary files are removed.
    """
    import shutil

    import h5py

    from . import store

    target = store._output_path(out)  # a symlink's target: the link stays a link
    theory = Path(f"{target}.theory.partial")
    partial = Path(f"{target}.partial")
    # what a run killed while adding the theory leaves (the theory's writer's own files too)
    leftovers = [theory, partial, Path(f"{theory}.partial"), Path(f"{theory}.lock")]
    if "theory" in store.list_runs(target):  # a resume of a finished file: nothing to write
        _remove_leftovers(target, leftovers)
        return
    lock = store._WriterLock(target)  # no writer of out may start meanwhile
    try:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        if "theory" in store.list_runs(target):
            return
        solution.to_hdf5(theory, "theory")
        _check_room_for_copy(target, target.stat().st_size + theory.stat().st_size)
        shutil.copyfile(target, partial)
        f = h5py.File(partial, "r+")
        try:
            with h5py.File(theory, "r") as src:
                src.copy(src["theory"], f, "theory")
            f.attrs["file_id"] = os.urandom(16).hex()
            f.flush()
        except BaseException:
            # what HDF5 could not write (a full disk) goes to a scratch file, so that it can
            # close the file and the process does not crash when it exits
            store._close_file(f, discard=True)
            raise
        f.close()
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, target)
        _sync_directory(target.parent)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # (StoreError is an OSError)
        raise StoreError(f"cannot add the theory run to {out}: {exc}") from exc
    finally:
        for temporary in (theory, partial):
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        lock.release()


def _remove_leftovers(target: Path, leftovers: list[Path]) -> None:
    """Remove the temporary files a run killed while adding the theory left beside ``target``,
    if any, under its writer lock (another writer may be building ``<target>.partial``); when
    the lock cannot be had (a read-only directory, a writer at work) they are left."""
    from . import store

    if not any(os.path.lexists(p) for p in leftovers):
        return
    try:
        lock = store._WriterLock(target)
    except StoreError:
        return
    try:
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
    finally:
        lock.release()


def _check_room_for_copy(target: Path, size: int) -> None:
    """StoreError unless a file of ``size`` bytes (and HDF5's slack) fits beside ``target``:
    on its disk, and under this process's file size limit (RLIMIT_FSIZE). HDF5 does not
    recover well from a write that fails for want of room (see fastrace.store), so the room
    is checked before it writes."""
    from . import store

    need = size + store._ROOM_SLACK
    fd = os.open(target, os.O_RDONLY)
    try:
        free = store._free_bytes(fd)
    finally:
        os.close(fd)
    if need > free:
        raise StoreError(f"no room on the disk holding it for the file with the theory, built "
                         f"beside it ({free} bytes free, {need} needed)")
    limit = store._file_size_limit()
    if limit is not None and need > limit:
        raise StoreError(f"the file with the theory would outgrow this process's file size "
                         f"limit of {limit} bytes (RLIMIT_FSIZE; see `ulimit -f`): {need} "
                         "bytes needed")


def _sync_directory(path: Path) -> None:
    """Make a rename in the directory ``path`` durable (where directories can be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that cannot sync a directory
        pass
    finally:
        os.close(fd)


def _check_resumable(out: Path, exp: Experiment) -> None:
    """Errors (before any compute) for a file ``exp`` cannot resume: one another experiment
    wrote, or one with a diverged run (resume refuses those in simulate's words)."""
    from . import store

    info = store.run_info(out)
    stored = str(info.get("config", ""))
    try:
        same = bool(stored) and same_experiment(stored, exp)
    except ConfigError as exc:
        raise ConfigError(f"{out} cannot be resumed from an experiment file: {exc}") from exc
    if not same:
        raise ConfigError(f"{out} was written by another experiment; resume it with the "
                          "experiment file it was started with")
    for name, run in info["runs"].items():
        if run["attrs"].get("kind") == "simulation" and run["status"].startswith(DIVERGED):
            raise StoreError(f"run {name!r} in {out} {run['status'][len('failed: '):]}; it "
                             "cannot be resumed: run the experiment again, without --resume, "
                             "with other [train] settings (a smaller train.lr, say)")


def run_experiment(exp: Experiment, out: str | os.PathLike, threads: int | None = None,
                   resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Run ``exp`` into the HDF5 file ``out`` and return a summary dict.

    One batched ``simulate`` call (one run ``seed_SS`` per init seed) streams into ``out``, whose
    root ``config`` attribute holds the experiment's TOML text; with a ``[theory]`` section the
    reduced theory (computed first, so a network that does not reduce fails before any
    training) is added as run ``theory``. ``resume=True`` continues the runs of an existing
    ``out`` written by the same experiment from their checkpoints (``fastrace.resume``); the
    result equals an uninterrupted run. Summary: {"out", "task", "runs": {name: {"status",
    "n_saved", "t_final", "loss_initial", "loss_final"}}, "theory" (None or the same keys),
    "resumed", "seconds"}.
    """
    from . import store
    from .simulate import resume as resume_runs
    from .simulate import simulate

    start = time.perf_counter()
    if not isinstance(exp, Experiment):
        raise ConfigError(f"run_experiment takes an Experiment (load_experiment), got "
                          f"{type(exp).__name__}")
    # absolute: the caller may change directory while the runs go; checked before any compute
    # (the theory is computed before the runs start)
    out = Path(os.path.abspath(os.fspath(out)))
    resumed = bool(resume) and out.exists()
    if resumed:
        _check_resumable(out, exp)
    else:
        store.check_writable(out)
    task = build_task(exp)
    net, data = task.network, task.data
    reduction = solution = None
    if exp.init["kind"] == "aligned" or exp.theory is not None:
        from .reduce import reduce

        kwargs = {"tol": exp.theory["tol"]} if exp.theory and "tol" in exp.theory else {}
        reduction = reduce(net, data, **kwargs)
    if exp.theory is not None:
        _check_theory_memory(exp, reduction)
        solution = integrate_theory(exp, reduction, threads)

    if resumed:
        trajectories = resume_runs(out, net, data, threads=threads, progress=progress,
                                   in_memory=False)
        if not isinstance(trajectories, list):
            trajectories = [trajectories]
    else:
        weights = initial_weights(exp, task, reduction)
        seed = exp.init["seeds"][0] if len(exp.init["seeds"]) == 1 else None
        # the rows live in the file only: memory stays small however long the runs are
        trajectories = simulate(net, data, weights, out=out, run_names=exp.run_names,
                                threads=threads, progress=progress, config=exp.text, seed=seed,
                                in_memory=False, **exp.train)
    if solution is not None:
        _add_theory(out, solution)

    def brief(status: str, t: np.ndarray, loss: np.ndarray) -> dict[str, Any]:
        return {"status": status, "n_saved": int(t.size),
                "t_final": float(t[-1]) if t.size else math.nan,
                "loss_initial": float(loss[0]) if loss.size else math.nan,
                "loss_final": float(loss[-1]) if loss.size else math.nan}

    runs = {tr.run: brief(tr.status, tr.t, tr.loss) for tr in trajectories}
    theory = None
    if solution is not None:
        theory = brief("complete" if solution.solution.ok else "failed", solution.t, solution.loss)
    return {"out": str(out), "task": exp.task["name"], "runs": runs, "theory": theory,
            "resumed": resumed, "seconds": time.perf_counter() - start}
