"""Hostile inputs (issue 24): mutated plan.json, config.yaml and checkpoint files run through the CLI always end in
exit 0 with valid output or exit 2 with one line on stderr -- never a traceback, never a half-written output.
The Python API raises instaprune's own error types for bad arguments. Bounded: well under two minutes."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from instaprune.cli.main import main
from instaprune.core.errors import InstapruneError

HOSTILE = [None, True, -1, 0, 10**9, 1e308, math.nan, math.inf, -math.inf, "x", "", [], [1, "a"], {}, {"a": 1}]
FUZZ = settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny data folder, a checkpoint, a plan calibrated on it and the config.yaml of an evaluate run."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(data / f"c{c}" / f"{i}.png")
    assert main(["train", "--model", "tiny_resnet", "--data-path", str(data), "--epochs", "1", "-b", "6",
                          "--output-dir", str(root / "t")]) == 0
    ckpt = root / "t" / "model.pt"
    assert main(["calibrate", "--model", "tiny_resnet", "--checkpoint", str(ckpt), "--data-path", str(data),
                          "--target", "0.3", "--output-dir", str(root / "cal")]) == 0
    assert main(["evaluate", "--model", "tiny_resnet", "--checkpoint", str(ckpt), "--data-path", str(data),
                          "--plan", str(root / "cal" / "plan.json"), "--output-dir", str(root / "ev")]) == 0
    return {"root": root, "data": data, "ckpt": ckpt, "plan": root / "cal" / "plan.json",
            "config": root / "ev" / "config.yaml"}


_counter = [0]


def _fresh(root: Path) -> Path:
    _counter[0] += 1
    return root / f"out{_counter[0]}"


def run_cli(args, capsys, out: Path) -> None:
    """The one rule for every input: exit 0 with valid output, or exit 2 with one line and nothing written."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own (one-line) errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        metrics = out / "metrics.json"
        assert json.loads(metrics.read_text())["images"] > 0
    else:
        assert code == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("instaprune: warning")]
        assert len(lines) == 1 and lines[0].startswith("instaprune: error:"), err
        assert not (out / "metrics.json").exists()


def _paths(d, prefix=()):
    """Every (path, value) in a JSON-like tree."""
    yield prefix, d
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


def _set(d, path, value, drop=False):
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    if drop:
        if isinstance(cur, dict):
            del cur[path[-1]]
        else:
            cur.pop(path[-1])
    else:
        cur[path[-1]] = value


mutation = st.tuples(st.integers(0, 10_000), st.sampled_from(["drop", "set", "truncate", "swap"]),
                     st.sampled_from(HOSTILE))


@FUZZ
@given(m=mutation)
def test_fuzz_plan_json(world, capsys, m):
    index, op, value = m
    text = world["plan"].read_text()
    plan = json.loads(text)
    paths = [p for p, _ in _paths(plan) if p]
    path = paths[index % len(paths)]
    if op == "truncate":
        mutated = text[: index % len(text)]
    else:
        plan = copy.deepcopy(plan)
        if op == "swap":  # swap two points' names
            pts = plan["points"]
            i, j = index % len(pts), (index // 7) % len(pts)
            pts[i][0], pts[j][0] = pts[j][0], pts[i][0]
        else:
            _set(plan, path, value, drop=op == "drop")
        mutated = json.dumps(plan)
    f = world["root"] / "mutated_plan.json"
    f.write_text(mutated)
    out = _fresh(world["root"])
    run_cli(["evaluate", "--model", "tiny_resnet", "--checkpoint", world["ckpt"], "--data-path", world["data"],
             "--plan", f, "--output-dir", out], capsys, out)


@FUZZ
@given(m=mutation)
def test_fuzz_config_yaml(world, capsys, m):
    index, op, value = m
    text = world["config"].read_text()
    cfg = yaml.safe_load(text)
    keys = sorted(cfg)
    key = keys[index % len(keys)]
    if op == "truncate":
        mutated = text[: index % len(text)]
    else:
        if op == "drop":
            cfg.pop(key)
        else:
            cfg[key] = value
        mutated = yaml.safe_dump(cfg)
    f = world["root"] / "mutated.yaml"
    f.write_text(mutated)
    out = _fresh(world["root"])
    run_cli(["--config", f, "--output-dir", out], capsys, out)


@FUZZ
@given(m=mutation, kind=st.sampled_from(["nan", "inf", "dtype", "shape", "drop", "rename", "meta", "truncate"]))
def test_fuzz_checkpoint(world, capsys, m, kind):
    index, _, value = m
    obj = torch.load(world["ckpt"], weights_only=True)
    state = obj["model"]
    keys = sorted(state)
    key = keys[index % len(keys)]
    f = world["root"] / "mutated.pt"
    t = state[key]
    if kind == "nan" and t.is_floating_point() and t.numel():
        t.view(-1)[index % t.numel()] = math.nan
    elif kind == "inf" and t.is_floating_point() and t.numel():
        t.view(-1)[index % t.numel()] = -math.inf
    elif kind == "dtype":
        state[key] = t.to([torch.int64, torch.float64, torch.bool, torch.float16][index % 4])
    elif kind == "shape" and t.dim():
        state[key] = t[: max(t.shape[0] - 1, 0)]
    elif kind == "drop":
        del state[key]
    elif kind == "rename":
        state[key + ".x"] = state.pop(key)
    elif kind == "meta":
        paths = [p for p, _ in _paths(obj["meta"]) if p]
        _set(obj["meta"], paths[index % len(paths)], value)
    torch.save(obj, f)
    if kind == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: index % len(data)])
    out = _fresh(world["root"])
    run_cli(["evaluate", "--model", "tiny_resnet", "--checkpoint", f, "--data-path", world["data"],
             "--output-dir", out], capsys, out)


def test_python_api_raises_instaprune_errors(world):
    from instaprune.core.config import Preprocessing
    from instaprune.method.calibration import CalibrationConfig
    from instaprune.method.plan import Plan
    from instaprune.method.prune_aware import PruneAwareConfig
    from instaprune.method.regularizer import FeatureDecayConfig
    from instaprune.method.thresholds import ThresholdConfig
    from instaprune.pipeline.posthoc import PosthocSchedule
    from instaprune.training.checkpoint import load_weights
    from instaprune.training.loop import TrainConfig

    bad = [
        lambda: CalibrationConfig(target="0.5"), lambda: CalibrationConfig(thresholds="max"),
        lambda: CalibrationConfig(search_images=2.5), lambda: TrainConfig(epochs=None),
        lambda: TrainConfig(decay={"bogus": 1}), lambda: TrainConfig(decay="l1l2"), lambda: TrainConfig(lr=math.nan),
        lambda: ThresholdConfig(min_keep="a"),
        lambda: FeatureDecayConfig(lam=[1]), lambda: PruneAwareConfig(scale_bounds=(1,)),
        lambda: PosthocSchedule(prune_aware_epochs="3"), lambda: Preprocessing(input_size=10**9),
        lambda: Plan.from_dict("nope"), lambda: Plan.from_dict({"format": "instaprune-plan", "version": 2}),
        lambda: TrainConfig.from_dict({"epochs": 1, "bogus": 2}),
        lambda: load_weights(torch.nn.Linear(2, 2), world["data"] / "c0" / "0.png"),
    ]
    for fn in bad:
        with pytest.raises(InstapruneError):
            fn()
    assert TrainConfig(decay={"lam": 1.0}).decay.lam == 1.0  # a mapping where a config goes is read as one
