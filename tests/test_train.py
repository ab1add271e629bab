"""Training with feature decay: learns, logs per epoch, resumes exactly; prune-aware masks keep gradients."""
from __future__ import annotations

import json

import pytest
import torch

from instaprune.core.config import Preprocessing
from instaprune.core.errors import CheckpointError, ConfigError
from instaprune.data.datasets import ImageSet, iterate_batches
from instaprune.data.synthetic import make_dataset, mean_std
from instaprune.method.masked import MaskedModel
from instaprune.method.points import find_prune_points
from instaprune.method.regularizer import FeatureDecayConfig, attach_feature_decay
from instaprune.method.thresholds import ThresholdConfig
from instaprune.models import build_model
from instaprune.training.loop import TrainConfig, evaluate_top1, train


@pytest.fixture(scope="module")
def small():
    d = make_dataset(640, seed=5, size=16)
    mean, std = mean_std(d)
    return ImageSet(d.images, d.labels, d.class_names), Preprocessing(mean, std, 16)


def model_and_points():
    torch.manual_seed(0)
    m = build_model("tiny_resnet", 10)
    return m, find_prune_points(m, torch.zeros(1, 3, 16, 16))


def cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, augment="flip", decay=FeatureDecayConfig(0.5, "l1max"))
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_writes_metrics(small, tmp_path):
    data, pre = small
    model, points = model_and_points()
    before = evaluate_top1(model, data, pre)
    res = train(model, data, cfg(epochs=3), points, pre, out_dir=tmp_path, val=data)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["val_top1"] > before + 0.1
    assert all(r["decay_term"] > 0 for r in res.history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]


def test_feature_decay_lowers_the_penalty(small):
    data, pre = small
    terms = {}
    for lam in (0.0, 2.0):
        model, points = model_and_points()
        res = train(model, data, cfg(epochs=2, decay=FeatureDecayConfig(lam, "l1max")), points, pre)
        # measure the unscaled penalty of both models the same way
        probe = attach_feature_decay(model, FeatureDecayConfig(1.0, "l1max"), points)
        model.train()
        x = next(iter(iterate_batches(data, 256, pre.mean, pre.std)))[0]
        model(x)
        terms[lam] = float(probe.pop().detach())
        probe.remove()
        assert res.epochs == 2
    assert terms[2.0] < terms[0.0]


def test_resume_gives_identical_weights(small, tmp_path):
    data, pre = small
    m1, points = model_and_points()
    train(m1, data, cfg(epochs=2), points, pre, out_dir=tmp_path / "full")
    m2, _ = model_and_points()

    def crash(d):  # interrupt the run in its second epoch
        if d["epoch"] == 1 and d["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(m2, data, cfg(epochs=2), points, pre, out_dir=tmp_path / "part", progress=crash)
    m3, _ = model_and_points()
    train(m3, data, cfg(epochs=2), points, pre, out_dir=tmp_path / "part", resume=tmp_path / "part" / "checkpoint.pt")
    for (k, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError):
        train(m3, data, cfg(), points, pre, resume=tmp_path / "nothing.pt")


def test_prune_aware_phase_trains_through_masks(small):
    data, pre = small
    model, points = model_and_points()
    masked = MaskedModel(model, points, {n: 0.5 for n in points.names()}, ThresholdConfig("max", 0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, data, cfg(epochs=1, decay=FeatureDecayConfig(0.0)), points, pre, masked=masked)
    masked.remove()
    assert res.history[0]["train_loss"] == res.history[0]["train_loss"]  # finite
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_bad_train_config():
    with pytest.raises(ConfigError):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError):
        TrainConfig(augment="mixup")


def test_distillation_term_and_teacher_pull(small):
    import torch.nn.functional as F

    from instaprune.training.loop import _distill_term

    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 2.5, 0.0], [1.0, -1.0, 2.0]])
    T = 2.0
    p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
    want = float((p * (p.log() - q.log())).sum(1).mean()) * T * T  # KL(teacher || student), batch mean, * T^2
    got = float(_distill_term(s, lambda x: t, torch.zeros(2), T))  # type: ignore[arg-type]
    assert abs(got - want) < 1e-6
    assert float(_distill_term(t, lambda x: t, torch.zeros(2), T)) == pytest.approx(0.0, abs=1e-7)

    data, pre = small
    with pytest.raises(ConfigError, match="teacher"):
        m, pts = model_and_points()
        train(m, data, cfg(distill=0.5), pts, pre)
    with pytest.raises(ConfigError, match="distill"):
        cfg(distill=1.5)
    # unset: the study's weight where a teacher is there (gated and static training), none without one
    from instaprune.training.loop import DISTILL_WITH_TEACHER

    assert cfg().distill is None and DISTILL_WITH_TEACHER == 0.5
    assert (cfg().distill_weight(True), cfg().distill_weight(False)) == (0.5, 0.0)
    assert (cfg(distill=0.0).distill_weight(True), cfg(distill=0.3).distill_weight(False)) == (0.0, 0.3)
    # pure distillation (a = 1) from a fixed teacher moves the student's predictions towards the teacher's
    teacher, points = model_and_points()
    train(teacher, data, cfg(epochs=3, decay=FeatureDecayConfig(0.0)), points, pre)
    torch.manual_seed(7)
    student = build_model("tiny_resnet", 10)
    x = next(iterate_batches(data, 256, pre.mean, pre.std))[0]
    teacher.eval()

    def agreement() -> float:
        student.eval()
        with torch.no_grad():
            return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    before = agreement()
    train(student, data, cfg(epochs=3, distill=1.0, decay=FeatureDecayConfig(0.0)), points, pre, teacher=teacher)
    assert agreement() > before + 0.3  # measured 0.08 -> 0.52


def test_divergence_stops_at_once_and_non_finite_outputs_are_refused(small, tmp_path):
    """A NaN loss stops training with one clear error at the step it appears (ResNet-56 once trained 10 minutes on
    NaN weights); scoring refuses a network whose outputs are not finite (argmax of NaN scores chance)."""
    from instaprune.core.errors import ModelError

    data, pre = small
    model, points = model_and_points()
    with torch.no_grad():
        model.conv1.weight.fill_(float("nan"))
    with pytest.raises(ModelError, match="training diverged.*epoch 1, step 1"):
        train(model, data, cfg(), points, pre, out_dir=tmp_path)
    assert not (tmp_path / "model.pt").exists()
    with pytest.raises(ModelError, match="not finite"):
        evaluate_top1(model, data, pre)
