"""The CIFAR-10 study's result logic: paired bootstrap intervals and matched/interpolated rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from conftest import BENCH, bench_module
from instaprune.evaluation.report import write_markdown

common = bench_module("_common")  # cifar10_study imports it as a sibling module
st = bench_module("cifar10_study")
diagnosis, goals_summary, method_diagnosis = st.diagnosis, st.goals_summary, st.method_diagnosis
method_rows, paired_bootstrap, per_instance = st.method_rows, st.paired_bootstrap, st.per_instance


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    base = rng.random(4000) < 0.8
    assert paired_bootstrap(base, base, n=1000) == (0.0, 0.0)  # identical predictions: no difference at all
    worse = base.copy()
    worse[np.flatnonzero(base)[:200]] = False  # exactly 5 points worse
    lo, hi = paired_bootstrap(worse, base, n=2000)
    assert lo < -0.05 < hi and hi - lo < 0.02  # paired: the interval is narrow around the true difference
    assert paired_bootstrap(worse, base, n=2000) == (lo, hi)  # seeded


def test_per_instance_relates_flops_to_ease():
    dense_macs = 100.0
    flops = np.array([40.0, 60.0, 80.0, 100.0, 120.0])  # FLOPs = 2 x MACs: fractions 0.2 ... 0.6
    per = {"flops": flops, "correct": np.array([1, 1, 0, 1, 0], bool),
           "confidence": np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)}
    base = {"dense_correct": np.array([1, 1, 1, 0, 0], bool),
            "dense_confidence": np.array([0.5, 0.6, 0.7, 0.8, 0.9], np.float32)}
    q = per_instance(per, dense_macs, base)
    assert np.isclose(q["flops_frac_p50"], 0.4) and np.isclose(q["flops_frac_p10"], 0.24)
    assert np.isclose(q["spearman_own_confidence"], -1.0)  # more confident, fewer FLOPs: the paper's claim
    assert np.isclose(q["spearman_baseline_confidence"], 1.0)
    assert np.isclose(q["flops_frac_correct"], (0.2 + 0.3 + 0.5) / 3) and np.isclose(q["flops_frac_wrong"], 0.5)
    assert np.isclose(q["flops_frac_baseline_correct"], 0.3) and np.isclose(q["flops_frac_baseline_wrong"], 0.55)
    assert "spearman_baseline_confidence" not in per_instance(per, dense_macs, None)


def test_rows_matched_and_interpolated(tmp_path):
    measured = {0.3: (0.305, 0.90), 0.45: (0.47, 0.88), 0.6: (0.57, 0.85)}  # 0.6 misses by 3 points
    for t, (red, top1) in measured.items():
        d = tmp_path / f"ev_m_{t}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"flops_reduction": red, "top1": top1, "dense_top1": 0.91}))
        n = 1000
        np.savez(d / "per_image.npz", correct=np.arange(n) < top1 * n)
    base = np.arange(1000) < 910
    rows = {r["target"]: r for r in method_rows(tmp_path, "m", "m", base, 0.91)}
    assert not rows[0.3]["interpolated"] and rows[0.3]["top1"] == 0.90 and rows[0.3]["ci95"] is not None
    r = rows[0.45]  # 0.47 is 2 points off: interpolated between (0.305, 0.90) and (0.47, 0.88)
    assert r["interpolated"] and r["flops_reduction"] == 0.45
    assert abs(r["top1"] - (0.90 + (0.88 - 0.90) * (0.45 - 0.305) / (0.47 - 0.305))) < 1e-12
    assert rows[0.6].get("unmatched") and rows[0.6]["top1"] == 0.85  # beyond the measured range: as measured


def _plan(d: Path, top1: float, taus=None, points=None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps({"calibration": {"chosen": "greedy", "results": {"greedy": {"top1": top1}}},
                                             "taus": taus or {}, "points": points or []}))


def test_choices_on_holdout_and_stage_plan_growth(tmp_path):
    w = tmp_path / "resnet20"
    names = lambda s: {x.name for x in s}  # noqa: E731
    plan = st.stages("resnet20", tmp_path, "tr", "te", st.choose(tmp_path))
    assert "ft_control" in names(plan) and not any(n.startswith("ev_static") for n in names(plan))
    assert {f"pa_{c}_0.6" for c in st.GRID if c != "control"} <= names(plan)  # decay judged after prune-aware
    for i, cfg in enumerate(c for c in st.GRID if c != "control"):
        _plan(w / f"pa_{cfg}_0.6", 0.80 + (0.05 if cfg == "l21_0.05" else 0.0) + 0.001 * i)
    ch = st.choose(tmp_path)
    assert ch.cfg == "l21_0.05" and ch.mode is None
    assert {"cal_l21_0.05_0.6", "cal_l21_0.05_mean_all_0.6"} <= names(st.stages("resnet20", tmp_path, "tr", "te", ch))
    _plan(w / "cal_l21_0.05_0.6", 0.70)
    _plan(w / "cal_l21_0.05_mean_all_0.6", 0.90)
    _plan(w / "cal_l21_0.05_one_all_0.6", 0.85)
    _plan(w / "cal_l21_0.05_mean_cv_0.6", 0.80)
    ch = st.choose(tmp_path)
    assert (ch.mode, ch.select, ch.prune_aware) == ("mean", "all", None)
    assert "pa_l21_0.05_mean_all_0.6" in names(st.stages("resnet20", tmp_path, "tr", "te", ch))
    _plan(w / "pa_l21_0.05_mean_all_0.6", 0.91)
    ch = st.choose(tmp_path)
    assert ch.prune_aware is True
    order = [s.name for s in st.stages("resnet20", tmp_path, "tr", "te", ch)]
    plan = {s.name: s for s in st.stages("resnet20", tmp_path, "tr", "te", ch)}
    for t in st.TARGETS:
        assert {f"ev_pa_l21_0.05_mean_all_{t}", f"ev_pa_control_mean_all_{t}", f"ev_static_{t}",
                f"ev_pa_l21_0.05_mean_cv_{t}", f"ev_pa_l21_0.05_mean_rand_{t}"} <= set(plan)
    # priority: every method row, then static / control / ablations at 60% before the other targets
    assert max(order.index(f"ev_pa_l21_0.05_mean_all_{t}") for t in st.TARGETS) < order.index("ev_static_0.6")
    at60 = [order.index(n) for n in ("ev_static_0.6", "ev_pa_control_mean_all_0.6", "ev_pa_l21_0.05_mean_rand_0.6")]
    assert max(at60) < min(order.index(f"ev_static_{t}") for t in st.TARGETS if t != 0.6)
    assert order.index("ev_static_0.6") < order.index("pa_control_mean_all_0.6")
    assert "--search" in plan["pa_l21_0.05_mean_all_0.3"].args
    assert plan["pa_l21_0.05_mean_rand_0.3"].args is None  # waits for the CV selection's point count
    pts = [[f"p{i}", "conv", 16, 1] for i in range(10)]
    _plan(w / "pa_l21_0.05_mean_cv_0.3", 0.8, taus={"p1": 1.0, "p2": 1.0, "p3": 1.0}, points=pts)
    rand = {s.name: s for s in st.stages("resnet20", tmp_path, "tr", "te", ch)}["pa_l21_0.05_mean_rand_0.3"]
    assert rand.args.count("--include") == 3 and "--prune-aware-epochs" in rand.args
    ev = {s.name: s for s in st.stages("resnet20", tmp_path, "tr", "te", ch)}["ev_pa_l21_0.05_mean_rand_0.3"]
    assert ev.args.count("--include") == 3  # evaluation sees the same points as the calibration
    assert ev.args[ev.args.index("--checkpoint") + 1].endswith("pa_l21_0.05_mean_rand_0.3/model.safetensors")
    assert plan["ev_static_0.6"].args[plan["ev_static_0.6"].args.index("--pa-epochs") + 1] == str(
        st.EPOCHS["prune_aware"])
    lat = plan["lat_pa_l21_0.05_mean_all_0.6"]  # the method's rows get a timing stage, run only with --latency
    assert lat.quiet and lat.deps == ["ev_pa_l21_0.05_mean_all_0.6"] and lat.args[0] == "benchmark"
    assert lat.args[lat.args.index("--plan") + 1].endswith("pa_l21_0.05_mean_all_0.6/plan.json")
    assert "lat_pa_control_mean_all_0.6" not in plan and not plan["ev_static_0.6"].quiet


def test_rows_carry_latency(tmp_path):
    d = tmp_path / "ev_m_0.6"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"flops_reduction": 0.6, "top1": 0.9, "dense_top1": 0.91}))
    lat = {"dense_latency_ms": {"p50": 6.0}, "dynamic_latency_ms": {"p50": 4.0, "p90": 4.5}}
    rows = [{"batch": 1, "threads": 1, "dense_ms": 6.1, "dynamic_ms": 4.1, "measured_speedup": 6.1 / 4.1,
             "theoretical_speedup": 2.4, "efficiency": 0.62, **lat},
            {"batch": 32, "threads": 1, "dense_ms": 80.0, "dynamic_ms": 50.0, "measured_speedup": 1.6,
             "theoretical_speedup": 2.4, "efficiency": 0.67}]
    (tmp_path / "lat_m_0.6").mkdir()
    (tmp_path / "lat_m_0.6" / "benchmark.json").write_text(json.dumps({"rows": rows}))
    (r,) = method_rows(tmp_path, "m", "m", None, 0.91)
    assert r["latency_b1_t1"]["dynamic_p50_ms"] == 4.0 and r["latency_b1_t1"]["dense_ms"] == 6.1
    assert r["latency_b32_t1"]["measured_speedup"] == 1.6 and "dynamic_p50_ms" not in r["latency_b32_t1"]


def test_choice_score_reads_the_calibration_curve(tmp_path):
    d = tmp_path / "cal"
    _plan(d, 0.2)
    p = json.loads((d / "plan.json").read_text())
    assert st._holdout_top1(d / "plan.json") == 0.2  # no curve: the chosen calibration's top-1
    p["curve"] = [{"flops_reduction": 0.2, "top1": 0.9}, {"flops_reduction": 0.4, "top1": 0.7},
                  {"flops_reduction": 0.6, "top1": 0.2}, {"flops_reduction": 0.8, "top1": 0.1}]
    (d / "plan.json").write_text(json.dumps(p))
    # 0.3 -> 0.8, 0.45 -> 0.575, 0.6 -> 0.2 (linear between curve points)
    assert abs(st._holdout_top1(d / "plan.json") - (0.8 + 0.575 + 0.2) / 3) < 1e-12
    assert st._holdout_top1(tmp_path / "missing" / "plan.json") is None


def test_runner_sees_other_processes_stages(tmp_path):
    """A stage another live process writes (``--output-dir <dir>`` on its command line) counts as busy."""
    import subprocess

    out = tmp_path / "pa_x_0.6"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--output-dir", str(out)])
    try:
        for _ in range(50):  # the child's command line is visible once it has exec'd
            if common.is_busy(out):
                break
            __import__("time").sleep(0.1)
        dirs = common.busy_dirs()
        assert str(out) in dirs and common.is_busy(out, dirs)
        assert not common.is_busy(tmp_path / "other", dirs)
    finally:
        p.kill()
        p.wait()
    assert not common.is_busy(out)


def test_method_diagnosis_reads_the_evaluation_report(tmp_path):
    ev = tmp_path / "ev_x_0.6"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"flops_reduction": 0.6, "top1": 0.46, "dense_top1": 0.47}))
    per_point = [{"name": n, "channels": 16, "macs_share": sh, "cv": 0.5, "tau": 0.3, "keep_mean": k, "keep_cv": 0.1}
                 for n, sh, k in (("layer1.0.conv1", 0.25, 0.8), ("layer1.0.conv2", 0.25, 0.2),
                                  ("layer2.0.conv1", 0.125, 0.5), ("layer2.0.conv2", 0.375, 0.4), ("linear", 0.0, 0.3))]
    write_markdown(ev, "t", {"top1": 0.46}, per_point, ["a.png"], ["a note"])  # the format the study reads
    pa = tmp_path / "x_0.6" / "prune_aware"
    pa.mkdir(parents=True)
    pa.joinpath("metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_top1": t}) + "\n"
                                                    for e, t in ((1, 0.7), (2, 0.45))))
    assert method_diagnosis(tmp_path, "y", 0.6) is None  # not evaluated: nothing to diagnose
    d = method_diagnosis(tmp_path, "x", 0.6)
    assert d["train_top1"] == [0.7, 0.45] and d["dense_top1"] == 0.47 and d["top1"] == 0.46
    assert abs(d["keep_residual"] - (0.25 * 0.8 + 0.125 * 0.5) / 0.375) < 1e-9  # MACs-weighted
    assert abs(d["keep_internal"] - (0.25 * 0.2 + 0.375 * 0.4) / 0.625) < 1e-9
    assert d["keep_classifier"] == 0.3 and d["internal_share"] == 0.625
    md = "\n".join(diagnosis([{"diagnosis": d}, {"diagnosis": None}]))
    assert "| 0.60 | 0.700 / 0.450 | 0.4700 | 0.4600 | 0.700 | 0.320 | 0.300 | 0.625 |" in md


def test_goals_summary_judges_rows(tmp_path):
    meth = {"method": "method: decay", "interpolated": False, "baseline_top1": 0.90}
    rows = [{**meth, "target": 0.3, "flops_reduction": 0.30, "top1": 0.899},
            {**meth, "target": 0.6, "flops_reduction": 0.59, "top1": 0.898,  # matched (within 1.5 points)
             "latency_b1_t1": {}, "latency_b32_t1": {}},
            {"method": "method variant: other", "interpolated": False, "baseline_top1": 0.90, "target": 0.6,
             "flops_reduction": 0.6, "top1": 0.95, "minus_static": 0.065,  # variants are not the method:
             "minus_static_ci95": [0.05, 0.08]},  # shown, not judged
            {"method": "static: L1", "target": 0.6, "interpolated": False, "flops_reduction": 0.6, "top1": 0.885,
             "method_minus_row": 0.013, "method_minus_row_ci95": [0.004, 0.022]}]
    (tmp_path / "cifar10_resnet56.json").write_text(json.dumps({"rows": rows}))
    md = "\n".join(goals_summary(tmp_path))
    assert ("| resnet56 | method within 0.3 points of baseline at >= 60% FLOPs reduction | -0.20 points at 0.590 "
            "(best method row at >= 60%) | yes |") in md
    assert "+1.30 points [+0.40, +2.20] | yes |" in md
    assert "1 of 2 rows | no |" in md
    assert ("| resnet56 | (not judged) other at 60% | +5.00 points vs baseline at 0.600; +6.50 [+5.00, +8.00] vs "
            "static | - |") in md
    assert md.count("| yes |") == 2  # the variant's better numbers do not pass a goal
    assert "resnet20" not in md
    assert goals_summary(tmp_path / "missing") == []


def test_stage_cost_survives_a_killed_attempt_and_accumulates(tmp_path, monkeypatch):
    """The runner records a running stage's cost while it runs, so a session's end loses at most one poll."""
    import threading
    import time

    st = common

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
    monkeypatch.setattr(st, "stage_command", lambda s: [sys.executable, "-c", burn, "--output-dir", str(s.out)])
    monkeypatch.setattr(st, "COST_POLL_S", 0.05)
    s = st.Stage("x", [], tmp_path / "x", "metrics.json")
    seen = []
    t = threading.Thread(target=st.run_stage, args=(s, 1, False))
    t.start()
    while t.is_alive():
        if (s.out / "cost.json").is_file():
            seen.append(json.loads((s.out / "cost.json").read_text()))
        time.sleep(0.02)
    t.join()
    assert any(r.get("in_progress") for r in seen)  # provisional records while it ran
    first = json.loads((s.out / "cost.json").read_text())
    assert "in_progress" not in first and first["cpu_seconds"] >= 0.5 and (s.out / "done.json").is_file()
    st.run_stage(s, 1, False)  # a second attempt adds to the first
    second = json.loads((s.out / "cost.json").read_text())
    assert second["cpu_seconds"] >= first["cpu_seconds"] + 0.5 and second["seconds"] > first["seconds"]


def test_weights_manifest_lists_every_committed_weight_file():
    """results/ commits only the weights listed in results/weights.json (safetensors, sha256, command)."""
    import shutil

    w = bench_module("weights")
    if shutil.which("git") is None or not (BENCH.parent / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    m = w.load_manifest()
    assert m["kept"] and all(e["path"].endswith(".safetensors") and e["command"] for e in m["kept"])
    assert w.check(m) == []


def test_runner_adopts_a_stopped_runners_stage_and_records_its_cost_to_the_end(tmp_path, monkeypatch):
    """A stage whose runner was stopped while its child lives on: the next runner records the child's cost on
    (from the stopped runner's record of the attempt) and finishes the stage when the child ends."""
    import subprocess
    import threading

    monkeypatch.setattr(common, "COST_POLL_S", 0.05)
    out = tmp_path / "work" / "x_0.6"
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"step")
    burn = ("import json, sys, time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
            f"open({str(out / 'metrics.json')!r}, 'w').write(json.dumps({{'top1': 0.5}}))")
    p = subprocess.Popen([sys.executable, "-c", burn, "--output-dir", str(out)])
    reaper = threading.Thread(target=p.wait)  # its parent (here) reaps it, as init reaps a stopped runner's child
    reaper.start()
    try:
        for _ in range(50):
            if common.is_busy(out):
                break
            __import__("time").sleep(0.1)
        # the stopped runner's last record: 100 s and 40 CPU s of earlier attempts, this attempt just begun
        (out / "cost.json").write_text(json.dumps({"seconds": 100.0, "cpu_seconds": 40.0, "threads": 1,
                                                   "command": ["x"], "cpu_seconds_last_attempt": 0.0,
                                                   "in_progress": True}))
        stage = common.Stage("x_0.6", ["train"], out, "metrics.json")
        assert common.run_lanes(lambda: (None, [stage]), tmp_path / "work", lanes=1, threads=1)
    finally:
        p.kill()
        reaper.join()
    cost = json.loads((out / "cost.json").read_text())
    assert cost["adopted"] and "in_progress" not in cost
    assert 40.0 + 1.0 < cost["cpu_seconds"] < 40.0 + 30 and cost["seconds"] > 100.0 + 0.3
    assert cost["command"][-2:] == ["--output-dir", str(out)]
    assert (out / "done.json").is_file() and not (out / "checkpoint.pt").exists()
