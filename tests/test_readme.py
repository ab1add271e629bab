"""Every ``instaprune`` example of README.md's command-line workflow (the Command line section, then its export and
benchmark lines), run as written in a directory with tiny stand-ins for the CIFAR-10 files. Only two sizes are
scaled to the tiny data: ``--holdout 5000`` and ``--epochs 10``. ``instaprune demo`` is run by tests/test_demo.py."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from instaprune.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
SCALED = {("--holdout", "5000"): "12", ("--epochs", "10"): "1"}
EXTRA = ("instaprune export", "instaprune benchmark")  # later sections, continuing the same runs/ directory


def _commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Command line"):]
    section = section[: section.index("\n## ", 5)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        for ln in m.group(1).replace("\\\n", " ").splitlines():
            if ln.strip().startswith(EXTRA):
                lines.append(ln)
    return lines


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    assert words[0] == "instaprune"
    words = words[1:]
    for i in range(len(words) - 1):
        new = SCALED.get((words[i], words[i + 1]))
        if new is not None:
            words[i + 1] = new
    return words


def _folder(root: Path, per_class: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i:04d}.png")


def test_readme_lists_the_workflow():
    cmds = [_argv(c)[0] for c in _commands()]
    assert cmds[:6] == ["points", "evaluate", "train", "calibrate", "evaluate", "demo"]
    assert "export" in cmds and "benchmark" in cmds


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    from instaprune.models import build_model

    _folder(tmp_path / "cifar10-train-jpeg", 4, 0)
    _folder(tmp_path / "cifar10-test-jpeg", 20, 1)  # benchmark times 200 images one by one
    torch.manual_seed(0)
    model = build_model("resnet20")  # the public checkpoint's format: DataParallel keys under "state_dict"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 10.0},
               tmp_path / "resnet20-cifar10.th")
    monkeypatch.chdir(tmp_path)
    for line in _commands():
        argv = _argv(line)
        if argv[0] == "demo":
            continue  # the whole demo: tests/test_demo.py
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{line}\n{err}"
    m = json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())
    assert m["baseline_top1"] == 0.81 and "flops_reduction" in m
    assert (tmp_path / "runs" / "export" / "model.onnx").is_file()
    assert json.loads((tmp_path / "runs" / "bench" / "benchmark.json").read_text())["rows"]
