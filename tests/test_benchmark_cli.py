"""``instaprune benchmark``: the engine against the fastest dense model, end to end (structure, not timings)."""
from __future__ import annotations

import json

from instaprune.cli.main import main


def test_benchmark_writes_rows_with_every_field(tmp_path, capsys):
    out = tmp_path / "bm"
    rc = main(["benchmark", "--model", "tiny_resnet", "--input-size", "16", "--batches", "1,2", "--max-images", "3",
               "--pairs", "1", "--output-dir", str(out)])
    assert rc == 0
    d = json.loads((out / "benchmark.json").read_text())
    assert [r["batch"] for r in d["rows"]] == [1, 2]
    for r in d["rows"]:
        for key in ("dense_ms", "dynamic_ms", "measured_speedup", "theoretical_speedup", "efficiency",
                    "breakdown_ms", "dense_variant", "strategies", "level", "model"):
            assert key in r, key
        assert r["dense_ms"] > 0 and r["dynamic_ms"] > 0
        assert abs(r["efficiency"] - r["measured_speedup"] / r["theoretical_speedup"]) < 1e-9
        assert abs(r["theoretical_speedup"] - 1.0) < 1e-9  # no plan: nothing is pruned, no saliency is paid
    assert d["rows"][0]["dynamic_latency_ms"]["n"] == 3
    for key in ("instaprune", "torch", "cpu", "cores", "date", "load_avg"):  # what a timing depends on
        assert d["machine"][key], key
    assert "efficiency" in capsys.readouterr().out


def test_benchmark_bad_options_exit_2(tmp_path, capsys):
    for bad in (["--batches", "0,x"], ["--pairs", "0"]):
        rc = main(["benchmark", "--model", "tiny_resnet", "--output-dir", str(tmp_path / "x"), *bad])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("instaprune: error:") and len(err.strip().splitlines()) == 1
