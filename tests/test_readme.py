"""Every ``instaprune`` example line of README.md, run exactly as written (the same arguments and relative paths),
in README order, in one working directory holding tiny stand-ins at the paths the examples name.

The stand-ins make the README's own arguments cheap instead of rewriting them: every ``--data-path`` is a JPEG
ImageFolder of 8x8 images (10 classes; a ``train`` folder has 514 per class, so ``--holdout 5000`` fits and the
remaining 140 images make one batch of the default 128; any other folder 20 per class, the 200 images ``benchmark``
times one by one), and every ``--checkpoint`` outside ``runs/`` is a ResNet-20 checkpoint whose stored preprocessing
says 8x8 inputs, so each image costs 1/16 of a CIFAR image. Commands run in-process through ``main`` (what the
``instaprune`` script calls) and each one's outputs are checked. ``torchrun`` lines are not run (tests/test_ddp.py runs
``torchrun ... -m instaprune train`` with two processes on a small model).

The demo reads and writes nothing the other examples use, so it runs alongside them, as its own ``instaprune demo``
process in the same directory, while they run in this one: one thread each (the README's demo numbers are one
thread's), so the two cores of the CI machine share the work.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from instaprune.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE = 8  # the stand-in checkpoint's input size (its stored preprocessing), and the images' size
TRAIN_PER_CLASS = 514  # 5,140 images: --holdout 5000 fits, 140 left to train on (one batch of 128)
TEST_PER_CLASS = 20  # 200 images: benchmark's default --max-images
CLASSES = 10


def readme_commands() -> list[str]:
    """Every ``instaprune ...`` command of README.md's bash blocks in README order: backslash continuations joined,
    ``&&`` chains split (the Quick start's ``... && instaprune demo``), each distinct command once."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                cmd = " ".join(words)
                if words and words[0] == "instaprune" and cmd not in out:
                    out.append(cmd)
    return out


def _options(argv: list[str]) -> dict[str, str | bool]:
    opts: dict[str, str | bool] = {}
    for i, w in enumerate(argv):
        if w.startswith("-"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            opts[w] = True if nxt is None or nxt.startswith("-") else nxt
    return opts


def _folder(root: Path, per_class: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i:04d}.jpg", quality=90)


def _checkpoint(path: Path) -> None:
    from dataclasses import replace

    from instaprune.models import build_model, default_preprocessing
    from instaprune.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet20")
    pre = replace(default_preprocessing("resnet20"), input_size=SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, {"model_name": "resnet20", "num_classes": CLASSES, "preprocessing": pre.to_dict()})


def _stand_ins(commands: list[list[str]]) -> dict[str, int]:
    """Data folders and checkpoints at every input path the commands name (relative to the working directory,
    ``../`` included); returns each data folder's image count."""
    sizes: dict[str, int] = {}
    for argv in commands:
        opts = _options(argv)
        data, ckpt = opts.get("--data-path"), opts.get("--checkpoint")
        if isinstance(data, str) and data not in sizes:
            per_class = TRAIN_PER_CLASS if "train" in Path(data).name else TEST_PER_CLASS
            _folder(Path(data), per_class, seed=len(sizes))
            sizes[data] = per_class * CLASSES
        if isinstance(ckpt, str) and not ckpt.startswith("runs/") and not Path(ckpt).exists():
            _checkpoint(Path(ckpt))
    return sizes


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def _check_outputs(argv: list[str], printed: str, sizes: dict[str, int]) -> None:
    """What each command must have written (beyond exit code 0)."""
    cmd, opts = argv[0], _options(argv)
    out = Path(str(opts.get("--output-dir", "instaprune-demo" if cmd == "demo" else "")))
    if cmd != "points":
        assert (out / "config.yaml").is_file(), f"{out}/config.yaml"
    if cmd == "points":
        assert "prune points; dense" in printed and "layer3.2.conv2" in printed
    elif cmd == "train":
        for f in ("model.pt", "model.safetensors"):
            assert (out / f).is_file(), f"{out}/{f}"
        m = _json(out / "metrics.json")
        assert len(m["history"]) == int(opts["--epochs"])
        if "--gates" in opts:
            plan = _json(out / "plan.json")
            assert plan["gates"]["sites"] and m["calibration"]["flops_reduction"] > 0
        elif "--static-target" in opts:
            assert abs(m["flops_reduction"] - float(opts["--static-target"])) < 0.1 and "val_top1" in m
        else:
            assert m["epochs"] == int(opts["--epochs"]) and "val_top1" in m
    elif cmd == "calibrate" and "--gate-slim-off" in opts:  # a gated checkpoint slimmed: weights + plan
        plan = _json(out / "plan.json")
        assert plan["gates"]["static"] is not None and (out / "model.safetensors").is_file()
        assert plan["calibration"]["static_flops_reduction"] >= 0 and "removed" in plan["calibration"]["slim_off"]
    elif cmd == "calibrate":
        plan = _json(out / "plan.json")
        c = plan["calibration"]
        assert plan["taus"] and c["images"] == int(opts["--holdout"])
        assert abs(c["results"][c["chosen"]]["flops_reduction"] - float(opts["--target"])) <= c["tolerance"]
    elif cmd == "evaluate":
        m = _json(out / "metrics.json")
        assert m["images"] == sizes[str(opts["--data-path"])] and 0 <= m["dense_top1"] <= 1
        if "--plan" in opts:
            assert 0 <= m["top1"] <= 1 and "flops_reduction" in m
        if "--baseline-top1" in opts:
            assert m["baseline_top1"] == float(opts["--baseline-top1"])
        assert (out / "report.md").is_file()
    elif cmd == "demo":
        m = _json(out / "metrics.json")
        for key in ("baseline_top1", "dense_top1", "top1", "flops_reduction", "seconds"):
            assert key in m
        assert abs(m["flops_reduction"] - 0.42) <= 0.03 and 0 <= m["top1"] <= 1
        assert '"flops_reduction"' in printed and "report:" in printed
        for f in ("report.md", "plan.json", "accuracy_vs_flops.png", "difficulty_vs_flops.png"):
            assert (out / f).is_file(), f"{out}/{f}"
    elif cmd == "export":
        for f in ("model.onnx", "model.pt2", "model.safetensors"):
            assert (out / f).is_file(), f"{out}/{f}"
    elif cmd == "benchmark":
        rows = _json(out / "benchmark.json")["rows"]
        grid = {(b, t) for b in str(opts["--batches"]).split(",") for t in str(opts["--threads"]).split(",")}
        assert {(str(r["batch"]), str(r["threads"])) for r in rows} == grid
        assert all(r["dense_ms"] > 0 and r["dynamic_ms"] > 0 for r in rows)
    else:
        raise AssertionError(f"README example 'instaprune {cmd}': no output check in tests/test_readme.py")


def test_readme_lists_the_workflow():
    cmds = [shlex.split(c)[1] for c in readme_commands()]
    assert cmds == ["demo", "train", "evaluate", "calibrate", "train", "points", "evaluate", "train", "calibrate",
                    "evaluate", "export", "benchmark"]


def _start_demo(argv: list[str], logs: Path) -> subprocess.Popen:
    """``instaprune <argv>`` as its own process in the working directory (the venv's script, as the README runs it),
    one thread."""
    script = Path(sys.executable).with_name("instaprune")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "instaprune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(logs / "demo.out", "w") as out, open(logs / "demo.err", "w") as err:
        return subprocess.Popen([*cmd, *argv], stdout=out, stderr=err, env=env)


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"  # the README's ../ paths stay inside tmp_path
    work.mkdir()
    monkeypatch.chdir(work)
    commands = [shlex.split(c)[1:] for c in readme_commands()]
    sizes = _stand_ins(commands)
    capsys.readouterr()
    torch.set_num_threads(1)  # the demo process takes the other core
    demo: tuple[list[str], subprocess.Popen] | None = None
    try:
        for argv in commands:
            if argv[0] == "demo":
                demo = (argv, _start_demo(argv, tmp_path))
                continue
            code = main(argv)
            printed, err = capsys.readouterr()
            assert code == 0, f"instaprune {shlex.join(argv)}\n{err}"
            _check_outputs(argv, printed, sizes)
        assert demo is not None
        code = demo[1].wait(timeout=900)
        err = (tmp_path / "demo.err").read_text()
        assert code == 0, f"instaprune {shlex.join(demo[0])}\n{err[-3000:]}"
        _check_outputs(demo[0], (tmp_path / "demo.out").read_text(), sizes)
    finally:
        if demo is not None and demo[1].poll() is None:
            demo[1].kill()
            demo[1].wait()
