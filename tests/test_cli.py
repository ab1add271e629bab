"""The command line end to end, and every bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CIFAR_TEST, RESNET20, assert_clean_error, require_shared
from instaprune.cli.main import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err



def test_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "instaprune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "points", "analyze", "calibrate", "evaluate", "demo"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "instaprune", "calibrate", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert "--target" in r.stdout and "--data-path" in r.stdout


def test_points_lists_every_point(capsys, tmp_path):
    code, out, _ = run(["points", "--model", "resnet20", "--output-dir", tmp_path], capsys)
    assert code == 0
    assert "layer3.2.conv2" in out and "19 prune points" in out and "skipped:  conv1" in out
    data = json.loads((tmp_path / "points.json").read_text())
    assert len(data["points"]) == 19 and (tmp_path / "config.yaml").is_file()


def test_train_analyze_calibrate_evaluate_on_folder(capsys, tmp_path, tiny_folder):
    run_dir = tmp_path / "train"
    code, out, err = run(["train", "--model", "tiny_resnet", "--data-path", tiny_folder, "--holdout", 12,
                          "--epochs", 1, "-b", 8, "--lr", 0.05, "--lam", 0.5, "--output-dir", run_dir], capsys)
    assert code == 0, err
    assert (run_dir / "model.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    ckpt = run_dir / "model.pt"
    code, out, err = run(["analyze", "--model", "tiny_resnet", "--checkpoint", ckpt, "--data-path", tiny_folder,
                          "--holdout", 12, "--output-dir", tmp_path / "an"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["images"] == 12
    code, out, err = run(["calibrate", "--model", "tiny_resnet", "--checkpoint", ckpt, "--data-path", tiny_folder,
                          "--holdout", 12, "--target", 0.3, "--search", "shared", "--output-dir", tmp_path / "cal"],
                         capsys)
    assert code == 0, err
    plan = tmp_path / "cal" / "plan.json"
    code, out, err = run(["evaluate", "--model", "tiny_resnet", "--checkpoint", ckpt, "--data-path", tiny_folder,
                          "--holdout", 12, "--plan", plan, "--baseline-top1", 0.5, "--output-dir", tmp_path / "ev"],
                         capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["images"] == 24 and 0 <= m["top1"] <= 1 and "flops_reduction_p90" in m
    assert (tmp_path / "ev" / "report.md").is_file() and (tmp_path / "ev" / "flops_histogram.png").is_file()
    import numpy as np

    per = np.load(tmp_path / "ev" / "per_image.npz")  # per-image arrays for paired bootstrap intervals
    assert set(per.files) >= {"correct", "dense_correct", "flops", "confidence"} and per["correct"].shape == (24,)
    assert abs(per["correct"].mean() - m["top1"]) < 1e-9 and abs(per["dense_correct"].mean() - m["dense_top1"]) < 1e-9
    # --bn-recal: the plan comes with the weights whose BatchNorm statistics were re-estimated under its masks
    code, out, err = run(["calibrate", "--model", "tiny_resnet", "--checkpoint", ckpt, "--data-path", tiny_folder,
                          "--holdout", 12, "--target", 0.3, "--search", "shared", "--bn-recal", "--output-dir",
                          tmp_path / "calbn"], capsys)
    assert code == 0, err
    bn_plan = json.loads((tmp_path / "calbn" / "plan.json").read_text())
    assert bn_plan["calibration"]["chosen"] == "bn_recalibrated" and (tmp_path / "calbn" / "model.pt").is_file()
    code, out, err = run(["evaluate", "--model", "tiny_resnet", "--checkpoint", tmp_path / "calbn" / "model.pt",
                          "--data-path", tiny_folder, "--holdout", 12, "--plan", tmp_path / "calbn" / "plan.json",
                          "--output-dir", tmp_path / "evbn"], capsys)
    assert code == 0, err
    # the YAML config supplies options; explicit flags override it
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: tiny_resnet\ndata-path: {tiny_folder}\ncheckpoint: {ckpt}\ntarget: 0.9\n")
    code, out, err = run(["--config", cfg, "calibrate", "--target", "1.5", "--output-dir", tmp_path / "c2"], capsys)
    assert_clean_error(code, err, "target")


def test_prune_aware_recalibrates_on_the_points_it_trained(capsys, tmp_path, tiny_folder):
    """A CV top-k selection is made once, before the prune-aware phase: the final recalibration keeps those points
    (selecting anew on the trained weights would mask points the network never learnt to lose)."""
    out_dir = tmp_path / "pa"
    code, out, err = run(["train", "--model", "tiny_resnet", "--data-path", tiny_folder, "--holdout", 12,
                          "--epochs", 0, "-b", 8, "--lr", 0.05, "--prune-aware-epochs", 1, "--target", 0.3,
                          "--select", "topk:2", "--search", "shared", "--output-dir", out_dir], capsys)
    assert code == 0, err
    start = json.loads((out_dir / "prune_aware" / "start_plan.json").read_text())
    final = json.loads((out_dir / "plan.json").read_text())
    assert final["selected"] == start["selected"] and len(start["selected"]) < len(start["points"])
    # 'plan:<path>' reuses another plan's points on other weights
    code, out, err = run(["calibrate", "--model", "tiny_resnet", "--checkpoint", out_dir / "model.pt", "--data-path",
                          tiny_folder, "--holdout", 12, "--target", 0.3, "--search", "shared", "--select",
                          f"plan:{out_dir / 'prune_aware' / 'start_plan.json'}", "--output-dir", tmp_path / "c"],
                         capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "plan.json").read_text())["selected"] == start["selected"]
    code, out, err = run(["calibrate", "--model", "tiny_resnet", "--checkpoint", out_dir / "model.pt", "--data-path",
                          tiny_folder, "--holdout", 12, "--select", f"plan:{tmp_path / 'none.json'}",
                          "--output-dir", tmp_path / "c2"], capsys)
    assert_clean_error(code, err, "plan")


def test_resnet20_reference_accuracy(capsys, tmp_path):
    require_shared()
    code, out, err = run(["evaluate", "--model", "resnet20", "--checkpoint", RESNET20, "--data-path", CIFAR_TEST,
                          "--output-dir", tmp_path, "-b", 500], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["images"] == 10000
    assert 0.807 <= m["dense_top1"] <= 0.813
    import numpy as np

    per = np.load(tmp_path / "per_image.npz")  # dense-only: correctness and confidence per image, dataset order
    assert per["dense_correct"].shape == per["dense_confidence"].shape == (10000,)
    assert abs(per["dense_correct"].mean() - m["dense_top1"]) < 1e-9
    assert ((per["dense_confidence"] >= 0.1) & (per["dense_confidence"] <= 1.0)).all()  # max softmax of 10 classes


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_folder):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    corrupt = d / "corrupt"
    (corrupt / "a").mkdir(parents=True)
    (corrupt / "a" / "ok.png").write_bytes((tiny_folder / "class0" / "0.png").read_bytes())
    (corrupt / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "garbage.th").write_bytes(b"\x00\x01garbage" * 50)
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(16, 3, 3, 3)}}, d / "partial.th")
    (d / "plan.json").write_text("{}")
    return d


def test_bad_inputs_fail_cleanly(capsys, tmp_path, tiny_folder, bad_files):
    out = tmp_path / "out"
    base = ["evaluate", "--model", "resnet20", "--output-dir", out]
    cases = [
        (base + ["--data-path", tmp_path / "nope"], "not found"),
        (base + ["--data-path", bad_files / "empty"], "no images"),
        (base + ["--data-path", bad_files / "corrupt"], "broken.jpg"),
        (base + ["--data-path", tiny_folder, "--checkpoint", bad_files / "garbage.th"], "cannot read"),
        (base + ["--data-path", tiny_folder, "--checkpoint", tmp_path / "missing.th"], "not found"),
        (base + ["--data-path", tiny_folder, "--checkpoint", bad_files / "partial.th"], "missing"),
        (["points", "--model", "resnet21"], "resnet21"),
        (["train", "--model", "tiny_resnet", "--data-path", tiny_folder, "--lam", "-1", "--output-dir", out],
         "lambda"),
        (["calibrate", "--model", "tiny_resnet", "--data-path", tiny_folder, "--target", "0", "--output-dir", out],
         "target"),
        (base + ["--data-path", tiny_folder, "--plan", bad_files / "plan.json"], "plan"),
        (["--config", tmp_path / "missing.yaml", "points", "--model", "resnet20"], "config"),
    ]
    for args, needle in cases:
        code, _, err = run(args, capsys)
        assert_clean_error(code, err, needle)
    assert not (out / "metrics.json").exists()  # nothing half-written


def test_plan_for_another_model_rejected(capsys, tmp_path, tiny_folder):
    code, _, err = run(["calibrate", "--model", "tiny_resnet", "--data-path", tiny_folder, "--target", "0.3",
                        "--search", "shared", "--output-dir", tmp_path], capsys)
    assert code == 0, err
    code, _, err = run(["evaluate", "--model", "resnet20", "--data-path", tiny_folder, "--plan",
                        tmp_path / "plan.json", "--output-dir", tmp_path / "ev"], capsys)
    assert_clean_error(code, err, "tiny_resnet", "resnet20")
    assert not (Path(tmp_path) / "ev" / "metrics.json").exists()
