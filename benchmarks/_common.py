"""What the scripts in ``benchmarks/`` share: the record every result file carries, and the study's stage runner.

Run the scripts as ``python benchmarks/<script>.py``: Python puts the script's directory on ``sys.path``, so they
import this module as ``_common`` (and everything else from the installed ``instaprune`` package).

**Run record** (:func:`run_meta`): command, git commit and whether tracked files were changed, and the machine as
:func:`instaprune.engine.bench.machine` sees it (torch, cores, CPU, platform, UTC date).

**Stage runner** (:class:`Stage`, :func:`run_stage`, :func:`run_lanes`): one stage = one subprocess with its own
output directory, up to N at once. A stage is done when ``done.json`` (written by :func:`run_stage` on success) or
its result file exists. Its cost (wall and CPU seconds, summed over attempts) is in ``cost.json``, written every
``COST_POLL_S`` while it runs, so an attempt killed with a session still counts. A stage whose output directory
another live process writes (its ``--output-dir`` on that process's command line) is busy and not started twice:
the runner adopts it (:func:`adopt_stage`: a stopped runner's child lives on; its cost is recorded on to its end).
On success the stage's step checkpoints are deleted: they only serve resuming and are never committed.

**Stage files** (:func:`load_metrics`, :func:`load_cost`, :func:`load_failed`, :func:`load_plan`,
:func:`load_benchmark`, :func:`load_history`): every ``metrics.json``, ``cost.json``, ``failed.json``,
``plan.json``, ``benchmark.json`` and ``metrics.jsonl`` a runner reads goes through one loader per format, which
checks the fields the runners read (types through the library's :func:`~instaprune.core.config.convert_value`,
finite numbers, ranges) and raises :class:`StageFileError` naming the file, the field and what was expected. A
script's ``main`` wrapped in :func:`one_line_errors` prints that as one line on stderr and exits with code 2
(never a traceback).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaprune.core.config import convert_value
from instaprune.core.errors import ConfigError, DataError, InstapruneError
from instaprune.core.io import atomic_write_json

__all__ = ["ROOT", "git", "run_meta", "Stage", "stage_command", "recorded_args", "run_stage", "cost_of", "run_lanes",
           "adopt_stage", "busy_procs", "busy_dirs", "is_busy", "COST_POLL_S", "StageFileError", "Field",
           "METRICS_FIELDS", "COST_FIELDS", "FAILED_FIELDS", "BENCHMARK_FIELDS", "PLAN_FIELDS", "HISTORY_FIELDS",
           "load_metrics", "load_cost", "load_failed", "load_benchmark", "load_history", "load_plan", "one_line_errors"]

ROOT = Path(__file__).resolve().parents[1]
STUDY_SCRIPT = Path(__file__).resolve().parent / "cifar10_study.py"  # script stages run ``cifar10_study.py ...``


def git(*args: str, default: str = "unknown") -> str:
    """Output of ``git ARGS`` in the repository (``default`` when git is missing or fails)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return default


def run_meta(script: str, argv: Sequence[str], **extra: Any) -> dict[str, Any]:
    """``command`` (``python benchmarks/<script> ARGV``), ``commit`` and ``git_dirty`` (tracked files changed),
    then ``torch``, ``cores``, ``cpu``, ``platform`` and UTC ``date`` from the library's machine record;
    ``extra`` fields are added last."""
    from instaprune.engine.bench import machine

    m = machine()
    return {"command": " ".join([f"python benchmarks/{script}", *argv]), "commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "-uno", default="")),
            **{k: m[k] for k in ("torch", "cores", "cpu", "platform", "date")}, **extra}


@dataclass
class Stage:
    name: str
    args: list[str] | None  # None: not buildable yet (waits for a dependency's output)
    out: Path
    done_file: str
    deps: list[str] = field(default_factory=list)
    script: bool = False  # run as ``cifar10_study.py`` instead of ``instaprune``
    quiet: bool = False  # a timing stage: runs only with ``run --latency`` (alone, on an otherwise idle machine)

    @property
    def log(self) -> Path:
        return self.out.parent / f"{self.out.name}.log"

    def done(self) -> bool:
        return (self.out / "done.json").is_file() or (self.out / self.done_file).is_file()


def busy_procs() -> dict[str, int]:
    """The ``--output-dir`` values on the command lines of live processes other than this one, each with its
    process id (one /proc scan)."""
    procs: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            procs.update((argv[i + 1].decode(errors="replace"), int(d.name)) for i, a in enumerate(argv[:-1])
                         if a == b"--output-dir")
    return procs


def busy_dirs() -> set[str]:
    """The ``--output-dir`` values on the command lines of live processes other than this one (one /proc scan)."""
    return set(busy_procs())


def is_busy(out: Path, dirs: set[str] | None = None) -> bool:
    """Another live process has ``--output-dir <out>`` on its command line."""
    return str(out) in (busy_dirs() if dirs is None else dirs)


COST_POLL_S = 60.0


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, with waited-for children) of a live process, from /proc; 0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def stage_command(s: Stage) -> list[str]:
    base = ([sys.executable, str(STUDY_SCRIPT.relative_to(ROOT))] if s.script
            else [sys.executable, "-m", "instaprune"])
    return [*base, *(s.args or []), "--output-dir", str(s.out)]


def recorded_args(out: Path) -> list[str]:
    """The arguments a finished stage in ``out`` ran with (from its cost.json), without its ``--output-dir``."""
    cost = load_cost(out / "cost.json", ("command",))
    if cost is None:
        raise StageFileError(f"{out / 'cost.json'}: not found (the stage's record of its command)")
    cmd = cost["command"]
    if not cmd or "--output-dir" not in cmd:
        raise StageFileError(f"{out / 'cost.json'}: field 'command': expected a command with --output-dir, got {cmd}")
    head = 1 if cmd[0].endswith(".py") else 2  # "<script>.py ..." or "-m instaprune ..."
    return cmd[head:cmd.index("--output-dir")]


def _record(s: Stage, prev: tuple[float, float], seconds: float, cpu: float, threads: int | None,
            cmd: list[str], **extra: object) -> dict:
    """Write the stage's ``cost.json``: the earlier attempts' wall and CPU seconds ``prev`` plus this attempt's."""
    # wall seconds include pauses (SIGSTOP for timing runs) and sharing the cores; CPU seconds are the work
    rec = {"seconds": prev[0] + seconds, "cpu_seconds": prev[1] + cpu, "threads": threads, "command": cmd,
           "cpu_seconds_last_attempt": cpu, **extra}
    atomic_write_json(s.out / "cost.json", rec)
    return rec


def _finish(s: Stage, rec: dict) -> None:
    """A successful stage: no failure record, its step checkpoints deleted (only for resuming), ``done.json``."""
    (s.out / "failed.json").unlink(missing_ok=True)
    for ck in (s.out / "checkpoint.pt", *s.out.glob("*/checkpoint.pt")):
        ck.unlink(missing_ok=True)
    atomic_write_json(s.out / "done.json", {**rec, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def run_stage(s: Stage, threads: int, dry: bool) -> float:
    cmd = stage_command(s)
    print(time.strftime("%H:%M:%S ") + ("DRY " if dry else "") + " ".join(cmd[1:]), flush=True)
    if dry:
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    s.out.mkdir(parents=True, exist_ok=True)
    old = load_cost(s.out / "cost.json") or {}
    prev = (old.get("seconds", 0.0), old.get("cpu_seconds") or 0.0)
    t0 = time.perf_counter()
    with open(s.log, "a") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:  # poll, so that an attempt killed with the session still leaves its cost (to the last minute)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # this child's own CPU time, also beside other lanes
            if pid:
                break
            _record(s, prev, time.perf_counter() - t0, _proc_cpu(p.pid), threads, cmd[1:], in_progress=True)
            time.sleep(COST_POLL_S)
        p.returncode = os.waitstatus_to_exitcode(status)
    seconds, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    rec = _record(s, prev, seconds, cpu, threads, cmd[1:])
    if p.returncode != 0:  # recorded; the runner goes on with stages that do not depend on it (retried next run)
        atomic_write_json(s.out / "failed.json", {**rec, "exit": p.returncode, "log": str(s.log)})
        print(f"stage {s.name} failed (exit {p.returncode}); see {s.log}", flush=True)
        return seconds
    _finish(s, rec)
    return seconds


def _proc_start(pid: int) -> float | None:
    """When a live process started (UTC epoch seconds), from /proc; None if it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # ended, not yet reaped by its parent
            return None
        ticks = int(fields[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def adopt_stage(s: Stage, pid: int, poll: float | None = None) -> float:
    """Go on recording the cost of a stage that process ``pid`` runs for a runner that was stopped (its child
    lives on): CPU from /proc every ``poll`` seconds until the process ends, then the record is closed (to the
    last poll: a non-child's final CPU time cannot be waited for; ``adopted`` says so) and, if the stage's
    result is there, the stage is finished as :func:`run_stage` does (``poll``: :data:`COST_POLL_S` unless
    given). Returns the attempt's wall seconds."""
    poll = COST_POLL_S if poll is None else poll
    start = _proc_start(pid)
    if start is None:
        return 0.0
    print(time.strftime("%H:%M:%S ") + f"adopted {s.name} (process {pid})", flush=True)
    cost = s.out / "cost.json"
    old = load_cost(cost) or {}
    prev = (old.get("seconds", 0.0), old.get("cpu_seconds") or 0.0)
    written = cost.stat().st_mtime if old else 0.0
    if old.get("in_progress") and written >= start:  # the stopped runner's record of this attempt
        prev = (prev[0] - (written - start), prev[1] - (old.get("cpu_seconds_last_attempt") or 0.0))
    try:
        cmd = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:-1]]
    except OSError:
        cmd = list(old.get("command") or [])
    seconds = cpu = 0.0
    while _proc_start(pid) == start:  # the same process (a pid is not reused while it lives)
        seconds, cpu = time.time() - start, max(cpu, _proc_cpu(pid))
        _record(s, prev, seconds, cpu, old.get("threads"), cmd, in_progress=True, adopted=True)
        time.sleep(poll)
    rec = _record(s, prev, seconds, cpu, old.get("threads"), cmd, adopted=True)
    if s.done():
        _finish(s, rec)
    return seconds


def cost_of(s: Stage) -> float | None:
    """Wall seconds of a stage: the runner's record, else ``/usr/bin/time`` output beside it, else training's."""
    cost = load_cost(s.out / "cost.json")
    if cost is not None:
        return float(cost["seconds"])
    tf = s.out.parent / f"{s.out.name}.time"  # /usr/bin/time -o of stages run by hand
    if tf.is_file() and tf.read_text().strip():
        try:
            return float(tf.read_text().split()[0])
        except ValueError:
            pass
    m = load_metrics(s.out / "metrics.json")
    if m is not None:  # a training's own record: its phases and its final calibration
        if m.get("seconds") is None:
            return None
        phases = [h.get("seconds") or 0.0 for h in m.get("prune_aware_history") or []]
        return float(m["seconds"]) + sum(phases) + float((m.get("calibration") or {}).get("seconds") or 0.0)
    return None


def run_lanes(build: Callable[[], tuple[object, list[Stage]]], workdir: Path, lanes: int, threads: int,
              only: str = "", latency: bool = False, dry: bool = False) -> bool:
    """Run the ready stages of ``build()`` (re-built after each stage: the plan grows with the choices), up to
    ``lanes`` at once; ``latency`` runs only the quiet (timing) stages, one at a time. False if another runner
    holds ``workdir``'s lock."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / ".runner.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"cifar10_study: another runner holds {workdir / '.runner.lock'}", file=sys.stderr)
        return False
    ran: set[str] = set()
    running: dict[Future, str] = {}
    if latency:
        lanes = 1  # timing stages run one at a time
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        while True:  # the plan grows as choices are made on the holdout; up to lanes stages at once
            _, plan = build()
            by_name = {s.name: s for s in plan}
            busy = busy_procs()
            dirs = set(busy)
            ready = [s for s in plan if not s.done() and s.args is not None and s.name.startswith(only)
                     and s.quiet == latency and s.name not in ran
                     and all(d in by_name and by_name[d].done() for d in s.deps) and not is_busy(s.out, dirs)]
            # stages of this plan that other processes run (a stopped runner's children) take lanes too: adopted
            # (their cost recorded on), unless another live runner holds them (it has this lock: not here)
            for s in plan:
                if s.name not in ran and not s.done() and is_busy(s.out, dirs) and not dry:
                    ran.add(s.name)
                    running[pool.submit(adopt_stage, s, busy[str(s.out)])] = s.name
            foreign = sum(1 for s in plan if s.name not in ran and not s.done() and is_busy(s.out, dirs))
            for s in ready[: max(lanes - len(running) - foreign, 0)]:
                ran.add(s.name)
                running[pool.submit(run_stage, s, threads, dry)] = s.name
            if not running:
                if foreign:  # wait for the other process's stages to finish, then fill the lanes
                    time.sleep(30)
                    continue
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED, timeout=60 if foreign else None)
            for f in finished:
                running.pop(f)
                f.result()
    return True


# ------------------------------------------------------------------------------------------------ stage files
class StageFileError(DataError):
    """A stage file is unreadable, not JSON, or lacks / mistypes a field the runners read."""


@dataclass(frozen=True)
class Field:
    """What a field of a stage file must be: ``kind`` ``number`` / ``integer`` (finite, in [lo, hi]), ``string``,
    ``strings`` (a list of strings), ``bool``, ``mapping``, ``records`` (a list of mappings) or ``value`` (of the
    annotation ``tp``, described as ``what``); ``null`` allows JSON null; ``of``: the fields of the mapping (of
    each mapping of the records), ``require`` the ones of them that must be there."""

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    null: bool = False
    of: dict[str, Field] | None = None
    require: tuple[str, ...] = ()
    tp: Any = None
    what: str = ""

    @property
    def expected(self) -> str:
        what = self.what or {"number": "a number", "integer": "an integer", "string": "a string",
                             "strings": "a list of strings", "bool": "true or false", "mapping": "a mapping",
                             "records": "a list of mappings"}[self.kind]
        if self.lo > -math.inf and self.hi < math.inf:
            what += f" in [{self.lo:g}, {self.hi:g}]"
        elif self.lo > -math.inf:
            what += f" >= {self.lo:g}"
        elif self.hi < math.inf:
            what += f" <= {self.hi:g}"
        elif self.kind == "number":
            what = "a finite number"
        return what + (" or null" if self.null else "")

    def check(self, value: Any, name: str) -> None:
        """Raise :class:`ConfigError` ``field '<name>': expected ..., got ...`` unless ``value`` fits."""
        where = f"field '{name}'"
        if value is None and self.null:
            return
        tp = self.tp if self.kind == "value" else {
            "number": float, "integer": int, "string": str, "strings": tuple[str, ...], "bool": bool, "mapping": dict,
            "records": tuple[dict, ...]}[self.kind]
        try:
            v = convert_value(value, tp, where)
            ok = not isinstance(v, (int, float)) or isinstance(v, bool) or self.lo <= v <= self.hi
        except (ConfigError, OverflowError):  # OverflowError: an integer too large for a float
            ok = False
        if not ok:
            got = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"{where}: expected {self.expected}, got {got}")
        if self.of is not None:
            for i, item in enumerate([value] if self.kind == "mapping" else value):
                check_fields(item, self.of, self.require, name if self.kind == "mapping" else f"{name}[{i}]")


def check_fields(d: dict, fields: dict[str, Field], require: Sequence[str] = (), prefix: str = "") -> None:
    """Check every field of ``fields`` that ``d`` has (fields not listed are not read, so not checked); the
    ``require`` ones must be there and not null."""
    for k in require:
        if d.get(k) is None:
            what = fields[k].expected.removesuffix(" or null")
            raise ConfigError(f"field '{prefix + '.' if prefix else ''}{k}' is missing (expected {what})")
    for k, f in fields.items():
        if k in d:
            f.check(d[k], f"{prefix}.{k}" if prefix else k)


FRACTION = Field("number", 0.0, 1.0)
SECONDS = Field("number", 0.0, null=True)
#: the fields of a stage's metrics.json (training, evaluation, static stage) that the runners read
METRICS_FIELDS: dict[str, Field] = {
    "top1": FRACTION, "dense_top1": FRACTION, "val_top1": Field("number", 0.0, 1.0, null=True),
    "flops_reduction": Field("number", hi=1.0), "flops_reduction_p10": Field("number", hi=1.0, null=True),
    "flops_reduction_p90": Field("number", hi=1.0, null=True), "dense_macs": Field("number", 0.0, null=True),
    "per_image_flops_p90_over_p10": Field("number", 0.0, null=True), "seconds": SECONDS,
    "calibration": Field("mapping", null=True, of={"top1": Field("number", 0.0, 1.0, null=True),
                                                   "seconds": SECONDS}),
    "prune_aware_history": Field("records", null=True, of={"seconds": SECONDS}),
}
#: cost.json (written by :func:`run_stage`; a few early ones by hand, with a ``note``)
COST_FIELDS: dict[str, Field] = {
    "seconds": Field("number", 0.0), "cpu_seconds": SECONDS, "cpu_seconds_last_attempt": SECONDS,
    "threads": Field("integer", 1.0), "command": Field("strings"), "in_progress": Field("bool"),
}
#: failed.json: the cost record of the failed attempt, its exit code and log
FAILED_FIELDS: dict[str, Field] = {**COST_FIELDS, "exit": Field("integer"), "log": Field("string")}
_MS = Field("number", 0.0)
#: benchmark.json of a timing stage (``instaprune benchmark``): the rows the study's report reads
BENCHMARK_FIELDS: dict[str, Field] = {"rows": Field("records", of={
    "batch": Field("integer", 1.0), "threads": Field("integer", 1.0), "dense_ms": _MS, "dynamic_ms": _MS,
    "measured_speedup": _MS, "theoretical_speedup": _MS, "efficiency": Field("number"),
    "dense_latency_ms": Field("mapping", of={"p50": _MS}, require=("p50",)),
    "dynamic_latency_ms": Field("mapping", of={"p50": _MS, "p90": _MS}, require=("p50", "p90"))},
    require=("batch", "threads", "dense_ms", "dynamic_ms", "measured_speedup", "theoretical_speedup", "efficiency"))}
#: the fields of a calibration stage's plan.json that the study reads (its choices, the random selection, plots)
PLAN_FIELDS: dict[str, Field] = {
    "points": Field("value", tp=tuple[tuple[str, str, int, int], ...],
                    what="a list of [name, kind, channels, groups] points"),
    "taus": Field("value", tp=dict[str, float], what="a mapping of point names to finite numbers"),
    "cv": Field("value", null=True, tp=dict[str, float | None], what="a mapping of point names to numbers"),
    "curve": Field("records", null=True, of={"flops_reduction": Field("number", hi=1.0, null=True),
                                             "top1": Field("number", 0.0, 1.0, null=True)}),
    "calibration": Field("mapping", null=True, of={
        "chosen": Field("string", null=True),
        "results": Field("value", null=True, tp=dict[str, dict], what="a mapping of calibrations")}),
}
#: one line (epoch) of a training phase's metrics.jsonl
HISTORY_FIELDS: dict[str, Field] = {"train_top1": Field("number", 0.0, 1.0, null=True),
                                    "train_flops_reduction": Field("number", hi=1.0, null=True)}


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_bytes())
    except OSError as e:
        raise StageFileError(f"{path}: cannot read: {e.strerror or e}") from e
    except RecursionError as e:
        raise StageFileError(f"{path}: nested too deeply; expected a JSON object") from e
    except json.JSONDecodeError as e:
        raise StageFileError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; truncated?); "
                             "expected a JSON object") from e
    except ValueError as e:  # not UTF-8, an integer of too many digits
        raise StageFileError(f"{path}: not valid JSON ({e}); expected a JSON object") from e
    if not isinstance(d, dict):
        raise StageFileError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _load(path: Path, fields: dict[str, Field], require: Sequence[str]) -> dict[str, Any] | None:
    d = _read_json(path)
    if d is None:
        return None
    try:
        check_fields(d, fields, require)
    except ConfigError as e:
        raise StageFileError(f"{path}: {e}") from e
    return d


def load_metrics(path: Path, require: Sequence[str] = ()) -> dict[str, Any] | None:
    """A stage's ``metrics.json`` (None if absent), its :data:`METRICS_FIELDS` checked; ``require``: fields that
    must be there (and not null)."""
    return _load(path, METRICS_FIELDS, require)


def load_cost(path: Path, require: Sequence[str] = ("seconds",)) -> dict[str, Any] | None:
    """A stage's ``cost.json`` (None if absent), its :data:`COST_FIELDS` checked."""
    return _load(path, COST_FIELDS, require)


def load_failed(path: Path) -> dict[str, Any] | None:
    """A stage's ``failed.json`` (None if absent): the failed attempt's cost record with its ``exit`` and ``log``."""
    return _load(path, FAILED_FIELDS, ("exit",))


def load_benchmark(path: Path) -> dict[str, Any] | None:
    """A timing stage's ``benchmark.json`` (None if absent), its rows checked (:data:`BENCHMARK_FIELDS`)."""
    return _load(path, BENCHMARK_FIELDS, ())


def load_history(path: Path) -> list[dict[str, Any]]:
    """The epochs of a training phase's ``metrics.jsonl`` (one JSON object a line; [] if absent), each checked
    (:data:`HISTORY_FIELDS`); errors name the line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StageFileError(f"{path}: cannot read: {e}") from e
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise StageFileError(f"{path}: line {i} is not valid JSON (truncated?); expected a JSON object") from e
        if not isinstance(d, dict):
            raise StageFileError(f"{path}: line {i}: expected a JSON object, got {type(d).__name__}")
        try:
            check_fields(d, HISTORY_FIELDS)
        except ConfigError as e:
            raise StageFileError(f"{path}: line {i}: {e}") from e
        out.append(d)
    return out


def load_plan(path: Path, require: Sequence[str] = (), chosen: bool = False) -> dict[str, Any] | None:
    """A calibration stage's ``plan.json`` (None if absent), its :data:`PLAN_FIELDS` checked (the library checks
    the whole plan when a command loads it); ``chosen``: ``calibration`` must name the chosen calibration, whose
    holdout ``top1`` the study's choices read."""
    d = _load(path, PLAN_FIELDS, (*require, "calibration") if chosen else require)
    if d is None or not chosen:
        return d
    cal = d["calibration"]
    c, results = cal.get("chosen"), cal.get("results") or {}
    if c not in results:
        raise StageFileError(f"{path}: field 'calibration.chosen': expected the name of one of "
                             f"'calibration.results' ({', '.join(results) or 'none'}), got {c!r}")
    try:
        FRACTION.check(results[c].get("top1"), f"calibration.results.{c}.top1")
    except ConfigError as e:
        raise StageFileError(f"{path}: {e}") from e
    return d


def one_line_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a script's ``main``: an instaprune error (a bad stage file, ...) is printed as one line on
    stderr, ``<prog>: error: <message>``, and ``main`` returns 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except InstapruneError as e:
                print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
                return 2
        return run
    return wrap
