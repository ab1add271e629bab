"""Hostile inputs (issue 24): mutated plan.json, config.yaml and checkpoint files run through the CLI always end in
exit 0 with valid output or exit 2 with one line on stderr -- never a traceback, never a half-written output.
The Python API raises instaprune's own error types for bad arguments.

Every mutation kind the issue lists (drop a key, change a type, NaN / inf / negative / huge numbers, truncate, swap
two points' names) is an explicit example of each file's test, so it runs whatever hypothesis draws; a few drawn
examples add variety. Bounded: well under two minutes (each run that passes validation costs an evaluation)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from instaprune.cli.main import main
from instaprune.core.errors import InstapruneError

HOSTILE = [None, True, -1, 0, 10**9, 1e308, math.nan, math.inf, -math.inf, "x", "", [], [1, "a"], {}, {"a": 1}]
#: drawn examples per test, on top of the explicit ones (derandomized: the same every run)
FUZZ = settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
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
    ckpt = root / "t" / "model.pt"
    with pytest.MonkeyPatch.context() as mp:  # the world's own plots are not under test (seconds each)
        mp.setattr("instaprune.pipeline.stages.write_plots", lambda *a, **k: [])
        mp.setattr("instaprune.evaluation.report.write_plots", lambda *a, **k: [])
        assert main(["train", "--model", "tiny_resnet", "--data-path", str(data), "--epochs", "1", "-b", "6",
                     "--output-dir", str(root / "t")]) == 0
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


def _pick(tree, where) -> tuple:
    """The path a mutation hits: a drawn int picks one of every path in ``tree``; an explicit example names it as
    a tuple, where an int under a mapping means its n-th key (point names are not known in advance)."""
    if isinstance(where, int):
        paths = [p for p, _ in _paths(tree) if p]
        return paths[where % len(paths)]
    out, cur = [], tree
    for k in where:
        k = list(cur)[k] if isinstance(cur, dict) and isinstance(k, int) else k
        out.append(k)
        cur = cur[k]
    return tuple(out)


def _two(index: int, n: int) -> tuple[int, int]:
    """Two different positions out of ``n`` (n >= 2) from one drawn int."""
    i = index % n
    return i, (i + 1 + (index // 7) % (n - 1)) % n


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


#: (where, op, value): ``where`` a drawn int (or, in explicit examples, the path / key / pair to hit)
mutation = st.tuples(st.integers(0, 10_000), st.sampled_from(["drop", "set", "truncate", "swap"]),
                     st.sampled_from(HOSTILE))


@FUZZ
@given(m=mutation)
@example(m=(("taus",), "drop", None))  # drop a key
@example(m=(("taus",), "set", "x"))  # change a type: a mapping replaced by a string (the report)
@example(m=(("points", 0), "set", {"a": 1}))  # change a type: a point replaced by a mapping
@example(m=(("taus", 0), "set", math.nan))  # NaN
@example(m=(("scale",), "set", math.inf))  # inf
@example(m=(("taus", 0), "set", -1))  # negative
@example(m=(("target",), "set", 1e308))  # huge
@example(m=(333, "truncate", None))  # truncated in the middle
@example(m=(8, "swap", None))  # two points' names swapped
def test_fuzz_plan_json(world, capsys, m):
    where, op, value = m
    text = world["plan"].read_text()
    plan = json.loads(text)
    if op == "truncate":
        mutated = text[: where % len(text)]
    else:
        plan = copy.deepcopy(plan)
        if op == "swap":  # swap two points' names
            pts = plan["points"]
            i, j = _two(where, len(pts))
            pts[i][0], pts[j][0] = pts[j][0], pts[i][0]
        else:
            _set(plan, _pick(plan, where), value, drop=op == "drop")
        mutated = json.dumps(plan)
    f = world["root"] / "mutated_plan.json"
    f.write_text(mutated)
    out = _fresh(world["root"])
    run_cli(["evaluate", "--model", "tiny_resnet", "--checkpoint", world["ckpt"], "--data-path", world["data"],
             "--plan", f, "--output-dir", out], capsys, out)


@FUZZ
@given(m=mutation)
@example(m=("data_path", "drop", None))  # drop a key
@example(m=("exclude", "set", {"a": 1}))  # change a type: a list replaced by a mapping
@example(m=("model", "set", ["x"]))  # change a type: a string replaced by a list
@example(m=("baseline_top1", "set", math.nan))  # NaN
@example(m=("scale", "set", -math.inf))  # inf
@example(m=("batch_size", "set", -1))  # negative
@example(m=("holdout", "set", 10**9))  # huge
@example(m=("scale", "set", 1e308))  # huge
@example(m=(200, "truncate", None))  # truncated in the middle
@example(m=(("checkpoint", "plan"), "swap", None))  # two keys' values swapped
def test_fuzz_config_yaml(world, capsys, m):
    where, op, value = m
    text = world["config"].read_text()
    cfg = yaml.safe_load(text)
    keys = sorted(cfg)
    if op == "truncate":
        mutated = text[: where % len(text)]
    else:
        if op == "swap":
            a, b = where if isinstance(where, tuple) else (keys[i] for i in _two(where, len(keys)))
            cfg[a], cfg[b] = cfg[b], cfg[a]
        else:
            key = where if isinstance(where, str) else keys[where % len(keys)]
            if op == "drop":
                cfg.pop(key)
            else:
                cfg[key] = value
        mutated = yaml.safe_dump(cfg)
    f = world["root"] / "mutated.yaml"
    f.write_text(mutated)
    out = _fresh(world["root"])
    run_cli(["--config", f, "--output-dir", out], capsys, out)


CHECKPOINT_KINDS = ["nan", "inf", "huge", "negative", "dtype", "shape", "drop", "rename", "swap", "meta", "truncate"]


@FUZZ
@given(m=mutation, kind=st.sampled_from(CHECKPOINT_KINDS))
@example(m=(0, "set", None), kind="nan")  # a NaN weight
@example(m=(5, "set", None), kind="inf")  # an infinite weight
@example(m=(3, "set", None), kind="huge")  # a weight of 3e38 (finite in float32)
@example(m=(0, "set", None), kind="negative")  # a negative BatchNorm running variance
@example(m=(1, "set", None), kind="dtype")  # a tensor of another dtype
@example(m=(2, "set", None), kind="shape")  # a tensor of another shape
@example(m=(4, "set", None), kind="drop")  # drop a tensor
@example(m=(6, "set", None), kind="rename")  # a tensor under an unknown name
@example(m=(9, "set", None), kind="swap")  # two tensors' names swapped
@example(m=(("preprocessing",), "set", "x"), kind="meta")  # change a type: a mapping replaced by a string
@example(m=(("preprocessing", "mean", 0), "set", math.nan), kind="meta")  # NaN in the stored preprocessing
@example(m=(("preprocessing", "input_size"), "set", 10**9), kind="meta")  # huge
@example(m=(("preprocessing", "std"), "drop", None), kind="meta")  # drop a key of the metadata
@example(m=(777, "set", None), kind="truncate")  # truncated in the middle
def test_fuzz_checkpoint(world, capsys, m, kind):
    where, op, value = m
    obj = torch.load(world["ckpt"], weights_only=True)
    state = obj["model"]
    keys = sorted(state)
    floats = [k for k in keys if state[k].is_floating_point() and state[k].numel()]
    f = world["root"] / "mutated.pt"
    if kind in ("nan", "inf", "huge"):
        t = state[floats[where % len(floats)]]
        t.view(-1)[where % t.numel()] = {"nan": math.nan, "inf": -math.inf, "huge": 3e38}[kind]
    elif kind == "negative":
        var = [k for k in keys if k.endswith("running_var")]
        t = state[var[where % len(var)]]
        t.view(-1)[where % t.numel()] = -1.0
    elif kind == "dtype":
        key = keys[where % len(keys)]
        state[key] = state[key].to([torch.int64, torch.float64, torch.bool, torch.float16][where % 4])
    elif kind == "shape":
        shaped = [k for k in keys if state[k].dim()]
        key = shaped[where % len(shaped)]
        state[key] = state[key][: max(state[key].shape[0] - 1, 0)]
    elif kind == "drop":
        del state[keys[where % len(keys)]]
    elif kind == "rename":
        key = keys[where % len(keys)]
        state[key + ".x"] = state.pop(key)
    elif kind == "swap":  # two tensors trade names
        a, b = (keys[i] for i in _two(where, len(keys)))
        state[a], state[b] = state[b], state[a]
    elif kind == "meta":
        _set(obj["meta"], _pick(obj["meta"], where), value, drop=op == "drop")
    torch.save(obj, f)
    if kind == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: where % len(data)])
    out = _fresh(world["root"])
    run_cli(["evaluate", "--model", "tiny_resnet", "--checkpoint", f, "--data-path", world["data"],
             "--output-dir", out], capsys, out)


@pytest.mark.parametrize("target", ["plan_scale", "plan_digits", "checkpoint_meta"])
def test_integers_beyond_float_range(world, capsys, target):
    """Huge integers (JSON and pickles keep Python ints exactly) where a number goes."""
    out = _fresh(world["root"])
    args = ["evaluate", "--model", "tiny_resnet", "--checkpoint", world["ckpt"], "--data-path", world["data"],
            "--output-dir", out]
    if target == "checkpoint_meta":
        obj = torch.load(world["ckpt"], weights_only=True)
        obj["meta"]["preprocessing"]["mean"][0] = 10**400
        torch.save(obj, world["root"] / "huge.pt")
        args[args.index(world["ckpt"])] = world["root"] / "huge.pt"
    else:
        f = world["root"] / "huge_plan.json"
        digits = 400 if target == "plan_scale" else 5000
        text = world["plan"].read_text().replace('"scale": 1.0', '"scale": 1' + "0" * digits)
        assert text != world["plan"].read_text()
        f.write_text(text)
        args += ["--plan", f]
    run_cli(args, capsys, out)


def test_negative_running_variance_is_refused(world, capsys):
    """A BatchNorm variance below zero would give NaN outputs that evaluate scores silently at chance."""
    obj = torch.load(world["ckpt"], weights_only=True)
    var = sorted(k for k in obj["model"] if k.endswith("running_var"))[0]
    obj["model"][var][0] = -0.5
    torch.save(obj, world["root"] / "negvar.pt")
    out = _fresh(world["root"])
    code = main(["evaluate", "--model", "tiny_resnet", "--checkpoint", str(world["root"] / "negvar.pt"),
                 "--data-path", str(world["data"]), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "negative variances" in err[0] and var in err[0]
    assert not out.exists()


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
