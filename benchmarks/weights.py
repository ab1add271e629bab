"""The weights a study commits, and the manifest that lists them (``results/weights.json``).

A study commits only the weights a later stage or a reported row needs, as safetensors; step checkpoints and the
weights of finished intermediate stages are never committed (``.gitignore`` ignores every ``*.pt`` and
``*.safetensors`` under ``results/``: a kept file is added with ``git add -f`` after ``keep`` listed it). Each kept
file is listed with its size, sha256, why it is kept and the command that regenerates it (the stage's recorded
command from its ``cost.json``; ``instaprune train`` writes ``model.safetensors`` beside ``model.pt``). Weights
removed from the tree are listed too, with the commit that still holds them (``git show <commit>:<path>``).

    python benchmarks/weights.py keep results/study/resnet20/adapt/model.pt --why "every new row starts here"
    python benchmarks/weights.py remove results/study/resnet20/ft_l21_0.05/model.pt ...   # record, then git rm
    python benchmarks/weights.py check      # the manifest matches the tracked weight files (also a test)

``keep`` converts a ``.pt`` to ``.safetensors`` beside it (same tensors and metadata), checks that the model built
from each gives bitwise the same outputs on a random batch, and adds the safetensors file to the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from _common import ROOT, git

MANIFEST = ROOT / "results" / "weights.json"
WEIGHT_SUFFIXES = (".pt", ".pth", ".th", ".safetensors", ".bin")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"about": "weights committed under results/ (kept) and weights removed from the tree (removed); "
                     "written by benchmarks/weights.py", "kept": [], "removed": []}


def save_manifest(m: dict[str, Any], path: Path = MANIFEST) -> None:
    from instaprune.core.io import atomic_write_text

    m["kept"] = sorted(m["kept"], key=lambda e: e["path"])
    m["removed"] = sorted(m["removed"], key=lambda e: e["path"])
    atomic_write_text(path, json.dumps(m, indent=1) + "\n")


def stage_command(weights: Path) -> str | None:
    """The command that produced ``weights``, as one shell line run from the repository root: its stage
    directory's recorded command (``cost.json``), else (a stage run by hand) the ``instaprune`` command with the
    resolved configuration it saved (``config.yaml``: its ``command`` and every option, ``output_dir`` included)."""
    for d in (weights.parent, weights.parent.parent):
        cost = d / "cost.json"
        if cost.is_file():
            cmd = json.loads(cost.read_text()).get("command")
            if cmd:
                return " ".join(["python", *cmd])
    for d in (weights.parent, weights.parent.parent):
        cfg = d / "config.yaml"
        cmd = [ln.split(":", 1)[1].strip() for ln in cfg.read_text().splitlines()
               if ln.startswith("command:")] if cfg.is_file() else []
        if cmd:
            return f"python -m instaprune {cmd[0]} --config {cfg}"
    return None


def _same_outputs(a: Path, b: Path) -> tuple[bool, str]:
    """Build the model of checkpoint ``a`` from ``a`` and from ``b``: identical tensors and identical logits?"""
    import torch

    from instaprune.pipeline.stages import load_model
    from instaprune.training.checkpoint import read_meta

    name = read_meta(a).get("model_name")
    if not name:
        return False, f"{a} records no model_name"
    ma, mb = load_model(name, a), load_model(name, b)
    sa, sb = ma.model.state_dict(), mb.model.state_dict()
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False, "state dicts differ"
    size = ma.pre.input_size
    x = torch.randn(8, len(ma.pre.mean), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(ma.model(x), mb.model(x))
    return same, f"{name}: {len(sa)} tensors equal; logits on 8 random inputs {'equal' if same else 'DIFFER'}"


def keep(pt: Path, why: str, m: dict[str, Any]) -> dict[str, Any]:
    """Convert ``pt`` to safetensors beside it (unless it is one), verify it, and list it as kept."""
    from instaprune.training.checkpoint import read_state_dict, save_safetensors

    st = pt if pt.suffix == ".safetensors" else pt.with_suffix(".safetensors")
    entry: dict[str, Any] = {"path": str(st.relative_to(ROOT)) if st.is_absolute() else str(st)}
    if st != pt:
        state, meta = read_state_dict(pt)
        save_safetensors(st, state, meta)
        ok, note = _same_outputs(pt, st)
        if not ok:
            st.unlink()
            raise SystemExit(f"weights: {st} does not reproduce {pt}: {note}")
        entry["converted_from"] = {"path": str(pt), "sha256": sha256(pt), "bytes": pt.stat().st_size,
                                   "check": note}
    entry.update(bytes=st.stat().st_size, sha256=sha256(st), why=why, command=stage_command(st))
    m["kept"] = [e for e in m["kept"] if e["path"] != entry["path"]] + [entry]
    return entry


def remove(path: Path, m: dict[str, Any], why: str) -> dict[str, Any]:
    """Record a weight file that leaves the tree (history keeps it): sha256, size, the last commit holding it."""
    rel = str(path)
    commit = git("log", "-1", "--format=%H", "--", rel, default="")
    entry = {"path": rel, "bytes": path.stat().st_size if path.is_file() else None,
             "sha256": sha256(path) if path.is_file() else None, "in_commit": commit or None,
             "restore": f"git show {commit}:{rel} > {rel}" if commit else None, "why": why,
             "command": stage_command(path)}
    m["removed"] = [e for e in m["removed"] if e["path"] != rel] + [entry]
    return entry


def tracked_weights() -> list[str]:
    out = git("ls-files", "results", default="")
    return sorted(p for p in out.splitlines() if p.endswith(WEIGHT_SUFFIXES))


def check(m: dict[str, Any]) -> list[str]:
    """Problems: tracked weight files not in the manifest, kept files missing or with another sha256."""
    kept = {e["path"]: e for e in m["kept"]}
    problems = [f"tracked but not in the manifest: {p}" for p in tracked_weights() if p not in kept]
    for p, e in kept.items():
        f = ROOT / p
        if not f.is_file():
            problems.append(f"kept but missing: {p}")
        elif f.stat().st_size != e["bytes"] or sha256(f) != e["sha256"]:
            problems.append(f"kept but changed (size or sha256): {p}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("keep", "remove", "check"))
    ap.add_argument("paths", nargs="*", help="weight files, relative to the repository root")
    ap.add_argument("--why", default="", help="why these are kept / removed (recorded)")
    a = ap.parse_args(argv)
    import os

    os.chdir(ROOT)
    m = load_manifest()
    if a.action == "check":
        problems = check(m)
        print("\n".join(problems) or f"weights: {len(m['kept'])} kept files match the manifest")
        return 1 if problems else 0
    for p in a.paths:
        e = keep(Path(p), a.why, m) if a.action == "keep" else remove(Path(p), m, a.why)
        print(json.dumps({k: e[k] for k in ("path", "bytes", "sha256") if k in e}))
    save_manifest(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
