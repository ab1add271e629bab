"""What the scripts in ``benchmarks/`` share: the record every result file carries, and the study's stage runner.

Run the scripts as ``python benchmarks/<script>.py``: Python puts the script's directory on ``sys.path``, so they
import this module as ``_common`` (and everything else from the installed ``instaprune`` package).

**Run record** (:func:`run_meta`): command, git commit and whether tracked files were changed, and the machine as
:func:`instaprune.engine.bench.machine` sees it (torch, cores, CPU, platform, UTC date).

**Stage runner** (:class:`Stage`, :func:`run_stage`, :func:`run_lanes`): one stage = one subprocess with its own
output directory, up to N at once. A stage is done when ``done.json`` (written by :func:`run_stage` on success) or
its result file exists. Its cost (wall and CPU seconds, summed over attempts) is in ``cost.json``, written every
``COST_POLL_S`` while it runs, so an attempt killed with a session still counts. A stage whose output directory
another live process writes (its ``--output-dir`` on that process's command line) is busy and not started twice.
On success the stage's step checkpoints are deleted: they only serve resuming and are never committed.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaprune.core.io import atomic_write_json

__all__ = ["ROOT", "git", "run_meta", "Stage", "stage_command", "recorded_args", "run_stage", "cost_of",
           "run_lanes", "busy_dirs", "is_busy", "COST_POLL_S"]

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


def busy_dirs() -> set[str]:
    """The ``--output-dir`` values on the command lines of live processes other than this one (one /proc scan)."""
    dirs: set[str] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            dirs.update(argv[i + 1].decode(errors="replace") for i, a in enumerate(argv[:-1])
                        if a == b"--output-dir")
    return dirs


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
    cmd = json.loads((out / "cost.json").read_text())["command"]
    head = 1 if cmd[0].endswith(".py") else 2  # "<script>.py ..." or "-m instaprune ..."
    return cmd[head:cmd.index("--output-dir")]


def run_stage(s: Stage, threads: int, dry: bool) -> float:
    cmd = stage_command(s)
    print(time.strftime("%H:%M:%S ") + ("DRY " if dry else "") + " ".join(cmd[1:]), flush=True)
    if dry:
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    s.out.mkdir(parents=True, exist_ok=True)
    cost = s.out / "cost.json"
    old = json.loads(cost.read_text()) if cost.is_file() else {}
    prev, prev_cpu = old.get("seconds", 0.0), old.get("cpu_seconds", 0.0)
    def record(seconds: float, cpu: float, **extra: object) -> dict:
        # wall seconds include pauses (SIGSTOP for timing runs) and sharing the cores; CPU seconds are the work
        rec = {"seconds": prev + seconds, "cpu_seconds": prev_cpu + cpu, "threads": threads, "command": cmd[1:],
               "cpu_seconds_last_attempt": cpu, **extra}
        atomic_write_json(cost, rec)
        return rec

    t0 = time.perf_counter()
    with open(s.log, "a") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:  # poll, so that an attempt killed with the session still leaves its cost (to the last minute)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # this child's own CPU time, also beside other lanes
            if pid:
                break
            record(time.perf_counter() - t0, _proc_cpu(p.pid), in_progress=True)
            time.sleep(COST_POLL_S)
        p.returncode = os.waitstatus_to_exitcode(status)
    seconds, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    r = p
    rec = record(seconds, cpu)
    if r.returncode != 0:  # recorded; the runner goes on with stages that do not depend on it (retried next run)
        atomic_write_json(s.out / "failed.json", {**rec, "exit": r.returncode, "log": str(s.log)})
        print(f"stage {s.name} failed (exit {r.returncode}); see {s.log}", flush=True)
        return seconds
    (s.out / "failed.json").unlink(missing_ok=True)
    for ck in (s.out / "checkpoint.pt", *s.out.glob("*/checkpoint.pt")):  # step checkpoints: only for resuming
        ck.unlink(missing_ok=True)
    atomic_write_json(s.out / "done.json", {**rec, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return seconds


def cost_of(s: Stage) -> float | None:
    """Wall seconds of a stage: the runner's record, else ``/usr/bin/time`` output beside it, else training's."""
    if (s.out / "cost.json").is_file():
        return float(json.loads((s.out / "cost.json").read_text())["seconds"])
    tf = s.out.parent / f"{s.out.name}.time"  # /usr/bin/time -o of stages run by hand
    if tf.is_file() and tf.read_text().strip():
        try:
            return float(tf.read_text().split()[0])
        except ValueError:
            pass
    if (s.out / "metrics.json").is_file():  # a training's own record: its phases and its final calibration
        m = json.loads((s.out / "metrics.json").read_text())
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
            busy = busy_dirs()
            ready = [s for s in plan if not s.done() and s.args is not None and s.name.startswith(only)
                     and s.quiet == latency and s.name not in ran
                     and all(d in by_name and by_name[d].done() for d in s.deps) and not is_busy(s.out, busy)]
            # stages of this model that other processes run (an earlier runner's children) take lanes too
            foreign = sum(1 for s in plan if s.name not in ran and not s.done() and is_busy(s.out, busy))
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
