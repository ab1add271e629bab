"""Options generated from the library's configs: every CLI default equals its dataclass default, choices come
from the library's tuples, help shows defaults and --config, global options go before or after the command,
YAML and output directories are checked before any work, and long commands report progress into a file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error
from instaprune.cli import commands
from instaprune.cli.main import build_parser, main
from instaprune.core.config import field_default


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err



def _subparsers(parser):
    return parser._subparsers._group_actions[0].choices


def test_every_cli_default_equals_its_dataclass_default():
    checked = 0
    for name, sub in _subparsers(build_parser()).items():
        for a in sub._actions:
            binding = getattr(a, "config_field", None)
            if binding is None:
                continue
            (cls, field), to_cli = binding
            expected = field_default(cls, field)
            expected = to_cli(expected) if to_cli is not None else expected
            assert a.default == expected, f"{name} {a.option_strings}: {a.default!r} != {cls.__name__}.{field}"
            checked += 1
    assert checked >= 40


def test_default_options_build_the_default_configs():
    from instaprune.method.calibration import CalibrationConfig
    from instaprune.method.gates import GateConfig
    from instaprune.pipeline.gated import GateSchedule
    from instaprune.pipeline.posthoc import PosthocSchedule
    from instaprune.training.loop import TrainConfig

    args = build_parser().parse_args(["train", "--model", "m", "--data-path", "d"])
    assert commands.train_config(args) == TrainConfig()
    assert commands.calibration_config(args) == CalibrationConfig()
    assert commands.posthoc_schedule(args) == PosthocSchedule()
    gcfg, schedule = commands._gate_configs(args)
    assert gcfg == GateConfig()
    default = GateSchedule()
    assert (schedule.ramp, schedule.warmup_batches, schedule.static_target) == (
        default.ramp, default.warmup_batches, default.static_target)


def test_choices_come_from_the_library():
    from instaprune.method.calibration import SEARCHES
    from instaprune.method.gates import GATE_MULTIPLIERS, GATE_PREDICTORS, GATE_SELECTIONS
    from instaprune.method.regularizer import PENALTIES, WEIGHTINGS
    from instaprune.method.thresholds import THRESHOLD_MODES

    train = {a.dest: a for a in _subparsers(build_parser())["train"]._actions}
    assert tuple(train["search"].choices) == SEARCHES and tuple(train["mode"].choices) == THRESHOLD_MODES
    assert tuple(train["penalty"].choices) == PENALTIES and tuple(train["weights"].choices) == WEIGHTINGS
    assert tuple(train["gate_selection"].choices) == GATE_SELECTIONS
    assert tuple(train["gate_multiplier"].choices) == GATE_MULTIPLIERS
    assert tuple(train["gate_predictor"].choices) == GATE_PREDICTORS


def test_help_shows_defaults_config_and_groups():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert "--config" in text and "-v, --verbose" in text, name
        if name != "points":
            assert "(default:" in text, name
    text = " ".join(_subparsers(parser)["train"].format_help().split())
    for needle in ("--lr LR peak learning rate", "(default: 0.1)", "(default: 10)", "(default: shared)",
                   "training (SGD", "feature decay:", "prune-aware phase", "calibration (", "predicted gates"):
        assert needle in text, needle


def test_global_options_before_or_after_the_command(capsys):
    assert run(["points", "--model", "resnet20", "-v"], capsys)[0] == 0
    assert run(["-v", "points", "--model", "resnet20"], capsys)[0] == 0


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", "x", "--data-path", "y", "--search", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "x", "--data-path", "y", "--target", "nan"])
    assert "finite" in capsys.readouterr().err


def test_yaml_config_checked(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet20\ninclude: [a\n")
    code, _, err = run(["--config", cfg, "points"], capsys)
    assert_clean_error(code, err, "at line 3, column 1")
    for text, needle in (("model: resnet20\ninput-size: [32]\n", "input-size"),
                         ("model: resnet20\ninput-size: abc\n", "integer"),
                         ("model: resnet20\nshortcuts: 3\n", "true or false"),
                         ("model: resnet20\nbogus: 1\n", "bogus"),
                         ("- just a list\n", "mapping")):
        cfg.write_text(text)
        code, _, err = run(["points", "--config", cfg], capsys)  # --config after the command works too
        assert_clean_error(code, err, needle)
    # a saved config.yaml re-runs the command by itself
    code, _, err = run(["points", "--model", "resnet20", "--output-dir", tmp_path / "p"], capsys)
    assert code == 0, err
    code, _, err = run(["--config", tmp_path / "p" / "config.yaml", "--output-dir", tmp_path / "q"], capsys)
    assert code == 0, err
    assert (tmp_path / "q" / "points.json").is_file()


def test_options_and_output_dir_refused_before_any_work(capsys, tmp_path, tiny_folder):
    missing = tmp_path / "no-such-data"
    code, _, err = run(["calibrate", "--model", "tiny_resnet", "--data-path", missing, "--target", "-0.3",
                        "--output-dir", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "target")  # refused before the (missing) data was looked at
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(["calibrate", "--model", "tiny_resnet", "--data-path", tiny_folder, "--output-dir", afile],
                       capsys)
    assert_clean_error(code, err, "not a directory")
    code, _, err = run(["analyze", "--model", "tiny_resnet", "--data-path", tiny_folder, "--output-dir",
                        tiny_folder / "out"], capsys)
    assert_clean_error(code, err, "inside the input data")
    assert not (tiny_folder / "out").exists()
    code, _, err = run(["train", "--model", "tiny_resnet", "--data-path", tiny_folder, "--epochs", "0",
                        "--output-dir", tmp_path / "t0"], capsys)
    assert_clean_error(code, err, "--epochs")
    # a run refused on its inputs leaves no output directory behind
    code, _, err = run(["calibrate", "--model", "tiny_resnet", "--data-path", tiny_folder, "--checkpoint",
                        Path(__file__), "--output-dir", tmp_path / "c"], capsys)
    assert_clean_error(code, err, "not a PyTorch checkpoint")
    assert not (tmp_path / "c").exists()
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run(["points", "--model", "resnet20", "--output-dir", ro / "x"], capsys)
        assert_clean_error(code, err, "writable")


def test_plan_refuses_other_weights_unless_told(capsys, tmp_path, tiny_folder):
    train_dir = tmp_path / "t"
    code, _, err = run(["train", "--model", "tiny_resnet", "--data-path", tiny_folder, "--holdout", 12, "--epochs",
                        1, "-b", 8, "--output-dir", train_dir], capsys)
    assert code == 0, err
    code, out, err = run(["calibrate", "--model", "tiny_resnet", "--checkpoint", train_dir / "model.pt",
                          "--data-path", tiny_folder, "--holdout", 12, "--target", 0.3, "--output-dir",
                          tmp_path / "cal"], capsys)
    assert code == 0, err
    assert "kept shared" in out  # why the kept plan won
    plan = json.loads((tmp_path / "cal" / "plan.json").read_text())
    assert plan["weights"].startswith("sha256:") and plan["calibration"]["reason"]
    base = ["evaluate", "--model", "tiny_resnet", "--data-path", tiny_folder, "--plan", tmp_path / "cal" / "plan.json"]
    code, _, err = run(base + ["--checkpoint", train_dir / "model.pt", "--output-dir", tmp_path / "e1"], capsys)
    assert code == 0, err
    code, _, err = run(base + ["--output-dir", tmp_path / "e2"], capsys)  # random init: other weights
    assert_clean_error(code, err, "other weights", "--allow-other-weights")
    assert not (tmp_path / "e2").exists()
    code, _, err = run(base + ["--allow-other-weights", "--output-dir", tmp_path / "e3"], capsys)
    assert code == 0 and "warning" in err and len(err.strip().splitlines()) == 1, err


def test_stratified_seeded_sample():
    from instaprune.data.datasets import ImageSet

    labels = torch.arange(10).repeat_interleave(50)  # class order: the first 100 are classes 0 and 1
    data = ImageSet(torch.zeros(500, 3, 4, 4, dtype=torch.uint8), labels, tuple(str(i) for i in range(10)))
    s = data.sample(100, seed=0)
    assert torch.bincount(s.labels, minlength=10).tolist() == [10] * 10
    assert torch.equal(data.sample(100, seed=0).labels, s.labels)
    a, b = data.split(100, 0)[1], data.split(100, 1)[1]
    assert len(a) == len(b) == 100
    assert data.sample(500) is data


def test_long_command_logs_progress_into_a_file(tmp_path, tiny_folder):
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "INSTAPRUNE_PROGRESS_SECONDS": "0.05", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "instaprune", "train", "--model", "tiny_resnet", "--data-path",
                            str(tiny_folder), "--epochs", "6", "-b", "4", "--output-dir", str(tmp_path / "run")],
                           stdout=subprocess.PIPE, stderr=f, text=True, timeout=600, env=env)
    assert r.returncode == 0, log.read_text()
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("instaprune: train:")]
    assert len(lines) >= 2, log.read_text()
    assert "steps" in lines[-1] and "elapsed" in lines[-1] and "ETA" in lines[-1]
    assert "\r" not in log.read_text()  # no terminal bar redraws in a file
    assert "trained 6 epochs" in r.stdout
