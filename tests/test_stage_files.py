"""The study's stage files (issue 24): a corrupt or wrong-typed metrics.json, cost.json, failed.json, plan.json,
benchmark.json or metrics.jsonl gives one line naming the file, the field and what was expected (exit 2 from the
scripts), never a traceback. Tiny: no training, the files are written by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import bench_module

common = bench_module("_common")
st = bench_module("cifar10_study")
StageFileError = common.StageFileError

METRICS = {"model": "resnet20", "images": 10, "dense_top1": 0.9, "top1": 0.85, "flops_reduction": 0.6,
           "flops_reduction_p10": 0.5, "flops_reduction_p90": 0.7, "dense_macs": 40_000_000, "seconds": 12.5,
           "calibration": {"top1": 0.8, "seconds": 3.0}, "prune_aware_history": [{"epoch": 1, "seconds": 4.0}]}
COST = {"seconds": 100.0, "cpu_seconds": 90.0, "threads": 1, "cpu_seconds_last_attempt": 90.0,
        "command": ["-m", "instaprune", "evaluate", "--model", "resnet20", "--output-dir", "x"]}
FAILED = {**COST, "exit": 143, "log": "x.log"}


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _with(d: dict, **changes) -> dict:
    out = json.loads(json.dumps(d))
    for k, v in changes.items():
        if v is ...:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_valid_files_load_and_missing_ones_are_none(tmp_path):
    assert common.load_metrics(_write(tmp_path / "m.json", METRICS), ("top1",)) == METRICS
    assert common.load_cost(_write(tmp_path / "c.json", COST)) == COST
    assert common.load_failed(_write(tmp_path / "f.json", FAILED))["exit"] == 143
    assert common.load_metrics(tmp_path / "none.json") is None and common.load_cost(tmp_path / "none.json") is None
    assert common.load_failed(tmp_path / "none.json") is None and common.load_plan(tmp_path / "none.json") is None
    assert common.load_history(tmp_path / "none.jsonl") == []
    # the fields runners do not read are not judged, and null where a stage may leave a value out
    assert common.load_metrics(_write(tmp_path / "m2.json", _with(METRICS, extra=math.nan, seconds=None)))
    assert common.recorded_args(_write(tmp_path / "s" / "cost.json", COST).parent) == [
        "evaluate", "--model", "resnet20"]


BAD = [  # (loader, file content, require, what the message must name)
    ("metrics", '{"top1": 0.8, "dense_', (), ["not valid JSON", "truncated", "expected a JSON object"]),
    ("metrics", "", (), ["not valid JSON"]),
    ("metrics", '"a string"', (), ["expected a JSON object, got str"]),
    ("metrics", [0.8], (), ["expected a JSON object, got list"]),
    ("metrics", _with(METRICS, top1=math.nan), (), ["field 'top1'", "expected a number in [0, 1]", "got nan"]),
    ("metrics", _with(METRICS, dense_top1=math.inf), (), ["field 'dense_top1'", "got inf"]),
    ("metrics", _with(METRICS, top1=1e308), (), ["field 'top1'", "in [0, 1]", "got 1e+308"]),
    ("metrics", _with(METRICS, top1="0.8"), (), ["field 'top1'", "expected a number", "got '0.8'"]),
    ("metrics", _with(METRICS, top1=True), (), ["field 'top1'", "got True"]),
    ("metrics", _with(METRICS, top1=...), ("top1",), ["field 'top1' is missing", "expected a number in [0, 1]"]),
    ("metrics", _with(METRICS, top1=None), ("top1",), ["field 'top1' is missing"]),
    ("metrics", _with(METRICS, seconds=-5.0), (), ["field 'seconds'", "expected a number >= 0", "got -5.0"]),
    ("metrics", _with(METRICS, calibration="x"), (), ["field 'calibration'", "expected a mapping", "got 'x'"]),
    ("metrics", _with(METRICS, calibration={"top1": -1}), (), ["field 'calibration.top1'", "got -1"]),
    ("metrics", _with(METRICS, prune_aware_history=[{"seconds": "x"}]), (),
     ["field 'prune_aware_history[0].seconds'", "expected a number >= 0"]),
    ("metrics", _with(METRICS, flops_reduction=10**400), (), ["field 'flops_reduction'", "expected a number <= 1"]),
    ("cost", _with(COST, seconds=...), ("seconds",), ["field 'seconds' is missing", "expected a number >= 0"]),
    ("cost", _with(COST, seconds=math.nan), ("seconds",), ["field 'seconds'", "got nan"]),
    ("cost", _with(COST, command="evaluate"), ("seconds",), ["field 'command'", "expected a list of strings"]),
    ("cost", _with(COST, threads=0), ("seconds",), ["field 'threads'", "expected an integer >= 1"]),
    ("cost", _with(COST, in_progress="yes"), ("seconds",), ["field 'in_progress'", "expected true or false"]),
    ("failed", _with(FAILED, exit=...), (), ["field 'exit' is missing", "expected an integer"]),
    ("failed", _with(FAILED, exit="143"), (), ["field 'exit'", "expected an integer", "got '143'"]),
    ("benchmark", {"rows": [{"batch": 1}]}, (), ["field 'rows[0].threads' is missing", "expected an integer"]),
    ("benchmark", {"rows": "x"}, (), ["field 'rows'", "expected a list of mappings"]),
]


@pytest.mark.parametrize("kind,content,require,names", BAD)
def test_bad_stage_file_names_file_field_and_expectation(tmp_path, kind, content, require, names):
    f = _write(tmp_path / "stage" / f"{kind}.json", content)
    load = {"metrics": lambda: common.load_metrics(f, require), "cost": lambda: common.load_cost(f, require),
            "failed": lambda: common.load_failed(f), "benchmark": lambda: common.load_benchmark(f)}[kind]
    with pytest.raises(StageFileError) as e:
        load()
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and "\n" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)


def test_bad_history_and_plan_files(tmp_path):
    hist = _write(tmp_path / "metrics.jsonl", '{"train_top1": 0.5}\n{"train_top1": 0.6}\n{"train_to')
    with pytest.raises(StageFileError, match=r"metrics.jsonl: line 3 is not valid JSON"):
        common.load_history(hist)
    _write(hist, '{"train_top1": 0.5}\n{"train_top1": NaN}\n')
    with pytest.raises(StageFileError, match=r"line 2: field 'train_top1': expected a number in \[0, 1\] or null, got"):
        common.load_history(hist)
    cal = {"chosen": "shared", "results": {"shared": {"top1": 0.5}}}
    plan = _write(tmp_path / "plan.json", {"calibration": cal, "taus": {"a": 0.1}, "points": [["a", "conv", 8, 1]]})
    assert common.load_plan(plan, ("taus", "points"), chosen=True)["taus"] == {"a": 0.1}
    for content, pattern in [
        ('{"calibration": {"chosen": "sh', r"plan.json: not valid JSON"),
        ({"calibration": cal, "points": [], "taus": "x"},
         r"field 'taus': expected a mapping of point names to finite numbers"),
        ({"calibration": cal, "points": [], "taus": {"a": math.nan}}, r"field 'taus': expected .*, got \{'a': nan\}"),
        ({"calibration": cal, "taus": {}, "points": [["a", "conv", 8]]},
         r"field 'points': expected a list of \[name, kind, "),
        ({"calibration": cal, "taus": {}, "points": [], "curve": [{"top1": 2.0}]},
         r"field 'curve\[0\].top1': expected a number in \[0, 1\]"),
        ({"calibration": cal, "points": []}, r"field 'taus' is missing"),
        ({"taus": {}, "points": []}, r"field 'calibration' is missing"),
        ({**{"taus": {}, "points": []}, "calibration": {"chosen": "greedy", "results": {}}},
         r"field 'calibration.chosen': expected the name of one of 'calibration.results' \(none\), got 'greedy'"),
        ({"taus": {}, "points": [], "calibration": {"chosen": "s", "results": {"s": {"top1": math.nan}}}},
         r"field 'calibration.results.s.top1': expected a number in \[0, 1\], got nan"),
    ]:
        with pytest.raises(StageFileError, match=pattern):
            common.load_plan(_write(plan, content), ("taus", "points"), chosen=True)


def _study_dir(tmp_path: Path) -> Path:
    """A study work directory with the first stages done (valid files), as ``status`` and ``report`` read them."""
    w = tmp_path / "work" / "resnet20"
    _write(w / "adapt" / "metrics.json", {"seconds": 50.0, "val_top1": 0.9})
    _write(w / "adapt" / "cost.json", COST)
    _write(w / "ev_dense" / "metrics.json", {"model": "resnet20", "images": 10, "dense_top1": 0.9})
    return tmp_path / "work"


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cifar10_study: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("rel,content,names", [
    ("adapt/cost.json", '{"seconds": 5', ["not valid JSON"]),
    ("adapt/cost.json", _with(COST, seconds="5 s"), ["field 'seconds'", "expected a number >= 0"]),
    ("ft_control/metrics.json", {"seconds": math.nan}, ["field 'seconds'", "got nan"]),  # no cost.json: its own
    ("ft_control/failed.json", _with(FAILED, exit=None), ["field 'exit' is missing", "expected an integer"]),
    ("pa_l1max_0.05_0.6/plan.json", '{"format": "instaprune-plan"', ["not valid JSON"]),
])
def test_status_refuses_a_bad_stage_file_in_one_line(tmp_path, capsys, rel, content, names):
    work = _study_dir(tmp_path)
    f = _write(work / "resnet20" / rel, content)
    line = _one_line_error(capsys, st.main(["status", "--model", "resnet20", "--work", str(work)]))
    assert str(f) in line, line
    for n in names:
        assert n in line, (n, line)


def test_status_shows_a_failed_stage_with_its_exit_code(tmp_path, capsys):
    work = _study_dir(tmp_path)
    _write(work / "resnet20" / "ft_control" / "failed.json", FAILED)
    assert st.main(["status", "--model", "resnet20", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert any(ln.startswith("FAIL") and "ft_control" in ln and "(exit 143)" in ln for ln in out.splitlines()), out


@pytest.mark.parametrize("rel,content,names", [
    ("ev_dense/metrics.json", {"images": 10, "dense_top1": math.nan},
     ["field 'dense_top1'", "expected a number in [0, 1]", "got nan"]),
    ("ev_dense/metrics.json", {"images": 10}, ["field 'dense_top1' is missing"]),
    ("ev_unadapted/metrics.json", {"dense_top1": "high"}, ["field 'dense_top1'", "got 'high'"]),
])
def test_report_refuses_a_bad_stage_file_in_one_line(tmp_path, capsys, rel, content, names):
    work = _study_dir(tmp_path)
    f = _write(work / "resnet20" / rel, content)
    results = tmp_path / "results"
    code = st.main(["report", "--model", "resnet20", "--work", str(work), "--results-dir", str(results)])
    line = _one_line_error(capsys, code)
    assert str(f) in line, line
    for n in names:
        assert n in line, (n, line)
    assert not list(results.glob("cifar10_*"))  # nothing written from a bad stage file
