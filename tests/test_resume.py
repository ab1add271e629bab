"""Crash-safe training checkpoints, in process: mid-epoch resume is bit-identical, signals save before
stopping, bad checkpoints give one-line errors. (Real crashes of a subprocess: ``test_resume_faults.py``.)"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from instaprune.core.config import Preprocessing
from instaprune.core.errors import CheckpointError, ConfigError
from instaprune.data.datasets import ImageSet
from instaprune.data.synthetic import make_dataset, mean_std
from instaprune.method.points import find_prune_points
from instaprune.method.regularizer import FeatureDecayConfig
from instaprune.models import build_model
from instaprune.models.tiny_resnet import tiny_resnet
from instaprune.training.artifacts import read_training_checkpoint
from instaprune.training.checkpoint import read_meta, save_checkpoint
from instaprune.training.loop import TrainConfig, train

EVERY = 3  # checkpoint every 3 optimizer steps; 10 steps per epoch, 2 epochs


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    d = make_dataset(160, seed=5, size=16)
    mean, std = mean_std(d)
    return ImageSet(d.images, d.labels, d.class_names), Preprocessing(mean, std, 16)


def fresh():
    torch.manual_seed(0)
    m = build_model("tiny_resnet", 10)
    return m, find_prune_points(m, torch.zeros(1, 3, 16, 16))


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, augment="cifar", seed=1, checkpoint_every=EVERY,
                decay=FeatureDecayConfig(0.5, "l1max"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def reference(small):
    torch.set_num_threads(1)
    data, pre = small
    m, points = fresh()
    res = train(m, data, cfg(), points, pre)
    return m.state_dict(), res


def same_history(a, b):
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a]
    return strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b]


def assert_identical(model, ref_state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_crash_mid_epoch_then_resume_is_bit_identical(small, reference, tmp_path):
    data, pre = small
    ref_state, ref_res = reference
    m, points = fresh()

    def crash(d):
        if d["global_step"] == 14:  # epoch 2, after its 4th step; last periodic checkpoint: step 12
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train(m, data, cfg(), points, pre, out_dir=tmp_path, progress=crash)
    state = read_training_checkpoint(tmp_path / "checkpoint.pt", fresh()[0])
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 12)
    assert 14 - state["global_step"] <= EVERY  # at most N steps lost
    assert state["reason"] == "periodic" and len(state["history"]) == 1
    m2, _ = fresh()
    res = train(m2, data, cfg(), points, pre, out_dir=tmp_path, resume=tmp_path / "checkpoint.pt")
    assert_identical(m2, ref_state)
    assert res.steps == ref_res.steps == 20 and res.resumed_from is not None
    assert same_history(res.history, ref_res.history)  # epoch metrics continue from the saved running sums
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_then_stops(small, reference, tmp_path, sig):
    data, pre = small
    ref_state, _ = reference
    m, points = fresh()

    def send(d):
        if d["global_step"] == 5:  # not a periodic checkpoint step
            os.kill(os.getpid(), sig)

    expected = KeyboardInterrupt if sig == signal.SIGINT else SystemExit
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(expected) as info:
        train(m, data, cfg(), points, pre, out_dir=tmp_path, progress=send)
    if sig == signal.SIGTERM:
        assert info.value.code == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    state = read_training_checkpoint(tmp_path / "checkpoint.pt", fresh()[0])
    assert state["global_step"] == 5 and state["reason"] == f"signal {sig.name}"
    m2, _ = fresh()
    train(m2, data, cfg(), points, pre, out_dir=tmp_path, resume="auto")
    assert_identical(m2, ref_state)


def test_resume_auto_starts_fresh_without_a_checkpoint_and_finished_runs_stay_finished(small, tmp_path):
    data, pre = small
    m, points = fresh()
    res = train(m, data, cfg(epochs=1, checkpoint_every=0), points, pre, out_dir=tmp_path, resume="auto")
    assert res.resumed_from is None and res.steps == 10
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res2 = train(m, data, cfg(epochs=1, checkpoint_every=0), points, pre, out_dir=tmp_path, resume="auto")
    assert res2.resumed_from is not None and res2.steps == 10 and len(res2.history) == 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    meta = read_meta(tmp_path / "checkpoint.pt")  # a training checkpoint is a readable instaprune checkpoint
    assert meta["global_batch"] == 16 and meta["world_size"] == 1
    with pytest.raises(ConfigError, match="output directory"):
        train(m, data, cfg(epochs=1), points, pre, resume="auto")


def test_mid_epoch_checkpoint_refuses_another_global_batch(small, tmp_path):
    data, pre = small
    m, points = fresh()

    def crash(d):
        if d["global_step"] == 4:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train(m, data, cfg(), points, pre, out_dir=tmp_path, progress=crash)
    with pytest.raises(CheckpointError, match="global batch 16") as info:
        train(fresh()[0], data, cfg(batch_size=32), points, pre, out_dir=tmp_path, resume="auto")
    assert "\n" not in str(info.value)


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(4096),
        "empty": b"",
        "one byte short": data[:-1],
    }
    out = {}
    for name, blob in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.pt"
        p.write_bytes(blob)
        out[name] = p
    return out


def test_corrupt_truncated_and_foreign_checkpoints_give_one_line_errors(small, tmp_path):
    data, pre = small
    m, points = fresh()
    train(m, data, cfg(epochs=1, checkpoint_every=0), points, pre, out_dir=tmp_path / "run")
    good = tmp_path / "run" / "checkpoint.pt"
    for name, path in _bad_files(tmp_path, good).items():
        with pytest.raises(CheckpointError) as info:
            train(fresh()[0], data, cfg(), points, pre, resume=path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg, (name, msg)
    weights_only = save_checkpoint(tmp_path / "weights.pt", m)
    with pytest.raises(CheckpointError, match="not a resumable training checkpoint"):
        train(fresh()[0], data, cfg(), points, pre, resume=weights_only)
    other = tiny_resnet(10, width=8)
    with pytest.raises(CheckpointError, match="mis-shaped keys") as info:
        read_training_checkpoint(good, other)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        train(fresh()[0], data, cfg(), points, pre, resume=tmp_path / "missing.pt")


def test_checkpoint_every_must_be_non_negative():
    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
