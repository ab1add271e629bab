"""Streaming saliency statistics: equal to a two-pass computation, mergeable, dead channels, selection."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_cnn
from instaprune.core.errors import ConfigError
from instaprune.method.analysis import SaliencyStats, analyze, select_points
from instaprune.method.points import find_prune_points
from instaprune.method.thresholds import saliency


def two_pass_cv(s: torch.Tensor) -> tuple[float, int]:
    s = s.double()
    mean = s.mean(0)
    dead = mean <= 0
    std = ((s - mean) ** 2).mean(0).sqrt()
    return float((std[~dead] / mean[~dead]).mean()), int(dead.sum())


@settings(deadline=None, derandomize=True, max_examples=25)
@given(st.integers(2, 60), st.integers(1, 12), st.integers(1, 5), st.integers(0, 3))
def test_streaming_equals_two_pass_and_merge(n, c, nb, dead):
    g = torch.Generator().manual_seed(n * 31 + c)
    s = torch.rand(n, c, generator=g) * torch.rand(1, c, generator=g) * 5
    s[:, : min(dead, c - 1)] = 0
    stats = SaliencyStats()
    for chunk in s.chunk(nb):
        stats.update("p", chunk)
        stats.n += chunk.shape[0]
    cv, ndead = two_pass_cv(s)
    assert stats.cv("p") == pytest.approx(cv, rel=1e-9, abs=1e-12)
    assert int(stats.dead("p").sum()) == ndead
    k = n // 2
    a, b = SaliencyStats(), SaliencyStats()
    a.update("p", s[:k]), b.update("p", s[k:])
    a.n, b.n = k, n - k
    merged = a.merge(b)
    assert merged.n == n
    assert torch.allclose(merged.sums["p"], stats.sums["p"]) and torch.allclose(merged.sumsq["p"], stats.sumsq["p"])
    assert merged.cv("p") == pytest.approx(cv, rel=1e-9, abs=1e-12)
    again = SaliencyStats.from_dict(stats.to_dict())
    assert again.cv("p") == pytest.approx(stats.cv("p"))


def test_analyze_model_matches_direct_saliencies():
    model = tiny_cnn()
    x = torch.randn(40, 3, 16, 16)
    rep = find_prune_points(model, x[:1])
    stats = analyze(model, [x[:15], x[15:]], rep)
    assert stats.n == 40
    feats = {}
    hooks = [dict(model.named_modules())[p.name].register_forward_pre_hook(
        lambda m, a, n=p.name: feats.__setitem__(n, saliency(a[0]))) for p in rep.points]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for p in rep.points:
        cv, ndead = two_pass_cv(feats[p.name])
        assert stats.cv(p.name) == pytest.approx(cv, rel=1e-6)
        assert int(stats.dead(p.name).sum()) == ndead
    table = stats.table(rep)
    assert [r["name"] for r in table] == rep.names()


def test_selection_by_kappa_topk_and_target():
    model = tiny_cnn()
    x = torch.randn(32, 3, 16, 16)
    rep = find_prune_points(model, x[:1])
    stats = analyze(model, [x], rep)
    cvs = {n: stats.cv(n) for n in rep.names()}
    top = select_points(stats, rep, top_k=1)
    assert top == [max(cvs, key=cvs.get)]
    kappa = sorted(cvs.values())[1]
    assert set(select_points(stats, rep, kappa=kappa)) == {n for n, v in cvs.items() if v >= kappa}
    assert select_points(stats, rep) == rep.names()
    # a target the top point alone cannot reach pulls in more points
    big = select_points(stats, rep, top_k=1, target=0.6)
    reach = sum(p.macs * 0.95 for p in rep.points if p.name in big) / rep.dense_macs
    assert len(big) > 1 and reach >= 0.6
    with pytest.raises(ConfigError):
        select_points(stats, rep, kappa=0.1, top_k=2)
