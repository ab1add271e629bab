"""Timing on a CPU machine prints no CUDA-probe noise from torch (issue 25, item 5)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import torch
from torch import nn
from instaprune.engine.bench import breakdown, time_alternating
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
x = torch.randn(1, 3, 8, 8)
time_alternating({"a": lambda: net(x)}, pairs=1, min_seconds=0.001)
breakdown(net, x, reps=1)
print("done")
"""


def test_timing_prints_no_cuda_probe_noise():
    env = {k: v for k, v in __import__("os").environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={**env,
                          "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "done" in done.stdout
    for noise in ("No CUDA runtime is found", "gpuGetDeviceCount", "profiler_start"):
        assert noise not in done.stderr, done.stderr
