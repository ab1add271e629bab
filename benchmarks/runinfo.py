"""What every benchmark result file records about its run: command, commit, torch, machine, date.

One helper for the scripts in ``benchmarks/`` (they import it as a sibling module: run them as
``python benchmarks/<script>.py``, or put ``benchmarks/`` on ``sys.path`` as the tests do).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "git", "cpu_name", "run_meta"]

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, default: str = "unknown") -> str:
    """Output of ``git ARGS`` in the repository (``default`` when git is missing or fails)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return default


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_meta(script: str, argv: Sequence[str], **extra: Any) -> dict[str, Any]:
    """``command`` (``python benchmarks/<script> ARGV``), ``commit`` and ``git_dirty`` (tracked files changed),
    ``torch``, ``cores``, ``cpu``, ``platform``, UTC ``date``; ``extra`` fields are added last."""
    import torch

    return {"command": " ".join([f"python benchmarks/{script}", *argv]), "commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "-uno", default="")), "torch": torch.__version__,
            "cores": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
