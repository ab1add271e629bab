"""Plans: round trip, model fingerprint check with a precise message, bad files."""
from __future__ import annotations

import pytest
import torch

from instaprune.core.errors import PlanMismatchError
from instaprune.method.plan import Plan
from instaprune.method.points import find_prune_points
from instaprune.models import build_model


def make_plan(name="resnet20"):
    rep = find_prune_points(build_model(name).eval(), torch.zeros(1, 3, 32, 32))
    return Plan(model_name=name, fingerprint=rep.fingerprint(), points=Plan.signature(rep),
                taus={n: 0.1 * i for i, n in enumerate(rep.names()[:5])}, target=0.5, cv={"x": 1.0}), rep


def test_plan_round_trip(tmp_path):
    plan, rep = make_plan()
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    again.check(rep)  # same model: fine
    assert again.with_scale(2.0).scale == 2.0


def test_plan_for_another_model_is_rejected_with_differences():
    plan, _ = make_plan("resnet20")
    other = find_prune_points(build_model("resnet32").eval(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(PlanMismatchError, match=r"resnet20.*points missing|extra points"):
        plan.check(other, "resnet32")
    vgg = find_prune_points(build_model("vgg16_bn_cifar").eval(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(PlanMismatchError) as e:
        plan.check(vgg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "other"}',
                                     '{"format": "instaprune-plan", "version": 99}',
                                     '{"format": "instaprune-plan", "version": 1}'])
def test_bad_plan_files(tmp_path, content):
    p = tmp_path / "plan.json"
    p.write_text(content)
    with pytest.raises(PlanMismatchError):
        Plan.load(p)
    with pytest.raises(PlanMismatchError, match="not found"):
        Plan.load(tmp_path / "missing.json")
