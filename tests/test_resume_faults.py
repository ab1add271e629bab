"""Real crashes of ``instaprune train`` (a subprocess): an exit right after a step, a death in the middle of
a checkpoint write and a SIGKILL at a random moment. Each time the latest checkpoint loads, at most
``--checkpoint-every`` steps are lost, and ``--resume auto`` ends with weights bit-identical to an
uninterrupted run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instaprune.models import build_model
from instaprune.training.artifacts import FAULT_EXIT_CODE, read_training_checkpoint

EVERY = 3  # --checkpoint-every; 160 images / batch 16 = 10 steps per epoch, 2 epochs = 20 steps
SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_image_folder(root: Path, n: int = 160, size: int = 32) -> Path:
    from PIL import Image

    from instaprune.data.synthetic import make_dataset

    d = make_dataset(n, seed=3, size=size)
    for i, (im, label) in enumerate(zip(d.images, d.labels, strict=True)):
        folder = root / d.class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTAPRUNE_FAULT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def train_cmd(data: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "instaprune", "-v", "train", "--model", "tiny_resnet",
            "--data-path", str(data), "-b", "16", "--epochs", "2", "--lr", "0.05", "--lam", "0.2",
            "--seed", "1", "--checkpoint-every", str(EVERY), "--output-dir", str(out), *more]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(**env), capture_output=True, text=True, timeout=300)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]


def checkpoint_state(out: Path) -> dict:
    return read_training_checkpoint(out / "checkpoint.pt", build_model("tiny_resnet", 10))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run, in this process (same CLI code, one thread like the subprocesses)."""
    from instaprune.cli.main import main

    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_cmd(folder, out)[4:]) == 0
    finally:
        torch.set_num_threads(threads)
    return weights(out)


def resume_and_compare(folder: Path, out: Path,
                       reference: dict[str, torch.Tensor]) -> subprocess.CompletedProcess:
    r = run(train_cmd(folder, out, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    got = weights(out)
    for k, v in reference.items():
        assert torch.equal(got[k], v), k
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    return r


def test_crash_after_a_step_loses_at_most_n_steps(folder, reference, tmp_path):
    r = run(train_cmd(folder, tmp_path), INSTAPRUNE_FAULT_STEP="8")
    assert r.returncode == FAULT_EXIT_CODE, r.stderr
    assert not (tmp_path / "model.pt").exists()
    state = checkpoint_state(tmp_path)
    assert state["global_step"] == 6 and 8 - state["global_step"] <= EVERY
    resume_and_compare(folder, tmp_path, reference)


def test_death_inside_a_checkpoint_write_keeps_the_previous_checkpoint(folder, reference, tmp_path):
    r = run(train_cmd(folder, tmp_path), INSTAPRUNE_FAULT_IN_CHECKPOINT="7")  # the write of step 9 dies
    assert r.returncode == FAULT_EXIT_CODE, r.stderr
    partial = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert checkpoint_state(tmp_path)["global_step"] == 6  # the latest complete checkpoint, intact
    r = resume_and_compare(folder, tmp_path, reference)
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))  # the partial write was cleaned up
    assert "partial checkpoint write" in r.stderr


def test_sigkill_at_a_random_moment(folder, reference, tmp_path):
    cmd = train_cmd(folder, tmp_path)
    proc = subprocess.Popen(cmd, env=cli_env(INSTAPRUNE_FAULT_DELAY="0.1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(random.Random().uniform(0.0, 0.5))  # somewhere in steps 3..8, maybe inside a write
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = checkpoint_state(tmp_path)  # never torn
    assert state["global_step"] % EVERY == 0 and 0 < state["global_step"] < 20
    resume_and_compare(folder, tmp_path, reference)
