"""Markdown report and plot of ``benchmarks/engine_latency.py`` results (``results/engine_latency.json``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["render", "goals", "readme_gate_table", "update_readme"]

GOAL_MODELS = ("resnet18", "resnet50")

#: what limits the efficiency (mechanisms measured while building the engine; see the tables for numbers)
LIMITS = [
    "- (to be written from the measured rows)",
]


def _posthoc(r: dict) -> bool:
    return r["level"] == "model" and r.get("method") != "gate"


def _gate(r: dict) -> bool:
    return r["level"] == "model" and r.get("method") == "gate"


def _f(v, nd: int = 2) -> str:
    return "" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _bd(r: dict) -> str:
    b = r.get("breakdown_ms") or {}
    return "/".join(f"{b.get(k, 0):.1f}" for k in ("saliency", "gather", "conv", "other"))


def _strat(r: dict) -> str:
    s = r.get("strategy")
    return " ".join(f"{k}:{v}" for k, v in s.items()) if isinstance(s, dict) else str(s)


def _keep(r: dict) -> str:
    return "floor" if r.get("keep") == 0.0 else _f(r.get("keep"))


def _q3(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[2] if len(values) > 1 else values[0]


def _short(r: dict) -> str:
    b = r.get("breakdown_ms") or {}
    parts = ", ".join(f"{k} {b[k]:.1f} ms" for k in ("saliency", "gather", "conv", "other") if k in b)
    return (f"dense {r['dense_ms']:.1f} ms, dynamic {r['dynamic_ms']:.1f} ms = {parts}; executed FLOPs reduction "
            f"{r.get('executed_flops_reduction', 0):.3f} of {r.get('flops_reduction', 0):.3f} required; "
            f"strategies {_strat(r)}")


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals against the measured rows (every thread count is reported separately)."""
    out = []
    model = [r for r in rows if _posthoc(r)]
    for n, goal in ((1, 0.75), (32, 0.6)):
        for r in model:
            if r["model"] in GOAL_MODELS and r["batch"] == n and r["keep"] == 0.5:
                ok = "meets" if r["efficiency"] >= goal else "BELOW"
                extra = " (stretch 0.9 met)" if n == 1 and r["efficiency"] >= 0.9 else ""
                out.append(f"- {r['model']} batch {n}, {r['threads']} thread(s), keep 0.5: efficiency "
                           f"**{r['efficiency']:.2f}** ({ok} the goal {goal}{extra}; measured "
                           f"{r['measured_speedup']:.2f}x of {r['theoretical_speedup']:.2f}x)")
                if r["efficiency"] < goal:
                    out.append(f"  - breakdown: {_short(r)}")
    for label, sel in ((f"{'/'.join(GOAL_MODELS)} model rows", lambda r: _posthoc(r)
                        and r["model"] in GOAL_MODELS),
                       ("all model rows", lambda r: _posthoc(r)),
                       ("all layer rows", lambda r: r["level"] == "layer")):
        ratios = sorted(r["time_ratio"] for r in rows if sel(r) and r["keep"] == 1.0)
        if ratios:
            q3 = _q3(ratios)
            verdict = "meets" if q3 <= 1.05 else "ABOVE"
            out.append(f"- keep 1.0, {label}: upper quartile of dynamic/dense time ratios **{q3:.3f}** over "
                       f"{len(ratios)} rows ({verdict} the goal 1.05; max {ratios[-1]:.3f})")
    for r in model:
        if r["keep"] == 1.0 and r.get("no_saliency_ms") is not None:
            pts = r.get("points") or 1
            sal = r["dynamic_ms"] - r["no_saliency_ms"]
            rest = r["no_saliency_ms"] - r["dense_ms"]
            out.append(f"  - {r['model']} batch {r['batch']}, {r['threads']} thread(s), keep 1.0: saliency + "
                       f"threshold {sal:.2f} ms ({1e3 * sal / pts:.0f} us per point, {pts} points), other "
                       f"per-point overhead {rest:.2f} ms against the fastest dense model "
                       f"({r['dense_variant']})")
    for r in model:
        if r["model"] == "resnet56" and r["keep"] in (0.0, 0.5):
            out.append(f"- CIFAR ResNet-56 batch {r['batch']}, {r['threads']} thread(s), keep {_keep(r)}: "
                       f"dense {r['dense_ms']:.2f} ms, dynamic {r['dynamic_ms']:.2f} ms, efficiency "
                       f"{r['efficiency']:.2f} (theoretical {r['theoretical_speedup']:.2f}x)")
    swept = [r for r in rows if "auto_over_best" in r]
    if swept:
        ok = sum(r["auto_over_best"] <= 1.10 for r in swept)
        ok_med = sum(r["auto_over_best_median"] <= 1.10 for r in swept)
        out.append(f"- auto within 10% of the best strategy measured for the row: **{ok} of {len(swept)}** "
                   f"rows by minimum times ({ok_med} by medians)")
        for r in swept:
            if r["auto_over_best"] > 1.10:
                out.append(f"  - {r['level']} {r['model']} {r.get('layer', '')} batch {r['batch']} "
                           f"{r['threads']}t keep {_keep(r)}: auto {r['auto_over_best']:.2f}x the best "
                           f"({r['best_strategy']}; auto ran {_strat(r)})")
    return out


GATE_GOALS = {1: (1.10, 0.85), 32: (1.25, 0.75)}  # batch -> (max dynamic / slim time, min efficiency)


def gate_goals(rows: list[dict]) -> list[str]:
    """Issue 22's goals against the ``method`` = ``gate`` rows."""
    out = []
    gate = [r for r in rows if _gate(r)]
    for r in gate:
        if r["model"] in GOAL_MODELS and r["keep"] == 0.5 and r["batch"] in GATE_GOALS:
            ratio, eff = GATE_GOALS[r["batch"]]
            ok = "meets" if r["ratio_to_slim"] <= ratio and r["efficiency"] >= eff else "MISSES"
            out.append(f"- {r['model']} batch {r['batch']}, {r['threads']} thread(s), keep 0.5: dynamic / slim "
                       f"**{r['ratio_to_slim']:.2f}** (goal <= {ratio}), efficiency **{r['efficiency']:.2f}** "
                       f"(goal >= {eff}): {ok}; {_short(r)}")
    ratios = sorted(r["time_ratio"] for r in gate if r["keep"] == 1.0)
    if ratios:
        q3 = _q3(ratios)
        out.append(f"- keep 1.0 (top-k keeps every channel: predictors skipped): upper quartile of dynamic / dense "
                   f"time **{q3:.3f}** over {len(ratios)} rows ({'meets' if q3 <= 1.03 else 'ABOVE'} the goal 1.03; "
                   f"max {ratios[-1]:.3f})")
        paid = sorted(r["predictors_ms"] / r["dense_ms"] for r in gate if r["keep"] == 1.0 and "predictors_ms" in r)
        if paid:
            out.append(f"  - the same rows with every predictor computed (a threshold plan whose gates all stay "
                       f"open): upper quartile **{_q3(paid):.3f}** (max {paid[-1]:.3f})")
    for r in gate:
        if r["model"] == "resnet56" and r["keep"] in (0.5, 0.3) and r["threads"] == 1:
            goal = 1.6 if r["batch"] == 1 else 1.8
            out.append(f"- CIFAR ResNet-56 batch {r['batch']}, 1 thread, keep {r['keep']} (synthetic budget, FLOPs "
                       f"reduction {r['flops_reduction']:.2f}): measured speedup "
                       f"**{r['measured_speedup']:.2f}x** (goal {goal}x at a real ~60% plan), slim "
                       f"{r['slim_speedup']:.2f}x")
        if r["model"] == "mobilenet_v2" and r["keep"] == 0.5 and r["batch"] == 1:
            out.append(f"- MobileNetV2 batch 1, {r['threads']} thread(s), keep 0.5: measured speedup "
                       f"**{r['measured_speedup']:.2f}x** (goal 1.3x), slim {r['slim_speedup']:.2f}x")
    return out + real_plan_goals()


RESULTS = Path(__file__).resolve().parents[1] / "results"


def real_plan_goals(results: Path = RESULTS) -> list[str]:
    """The ResNet-56 goal on real calibrated gated plans: study 2's latency rows (``cifar10_gates.py latency``,
    merged into ``results/cifar10_gates_resnet56.json`` by its report), 1 thread, ~60% FLOPs."""
    path = results / "cifar10_gates_resnet56.json"
    if not path.is_file():
        return []
    timed = [r for r in json.loads(path.read_text())["rows"]
             if r.get("latency") and "b1_slim_ms" in r["latency"] and abs(r["target"] - 0.6) < 1e-9]
    if not timed:
        return []
    out = []
    for b, goal in (("b1", 1.6), ("b32", 1.8)):
        sp = [r["latency"][f"{b}_speedup"] for r in timed]
        slim = [r["latency"][f"{b}_dense_ms"] / r["latency"][f"{b}_slim_ms"] for r in timed]
        out.append(f"- CIFAR ResNet-56, real calibrated gated plans at ~60% FLOPs (study 2, {len(timed)} rows, "
                   f"`results/cifar10_gates_resnet56.md`), batch {b[1:]}, 1 thread: measured speedup "
                   f"**{min(sp):.2f}-{max(sp):.2f}x** (goal {goal}x: {'meets' if max(sp) >= goal else 'MISSES'}), "
                   f"the slim model of the same MACs {min(slim):.2f}-{max(slim):.2f}x")
    return out


README_GATE_HEAD = ("| model | batch | threads | keep | dense ms | slim ms | dynamic ms | speedup (theor.) "
                    "| slim speedup | dynamic / slim | policy |")


def readme_gate_table(rows: list[dict]) -> list[str]:
    """The gate table of README's fast-engine section, rendered from the results (``tests/test_readme_tables``
    checks README against it, so no number there is typed by hand)."""
    out = [README_GATE_HEAD, "|" + "---|" * 11]
    cifar = ("resnet20", "resnet56")
    gate = [r for r in rows if _gate(r)]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["model"] for r in gate))}  # models in the order first timed
    gate.sort(key=lambda r: (r["model"] not in cifar, r["threads"], r["batch"], order[r["model"]], -r["keep"]))
    for r in gate:
        out.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['keep']} | {_f(r['dense_ms'])} | "
                   f"{_f(r['slim_ms'])} | {_f(r['dynamic_ms'])} | {_f(r['measured_speedup'])}x "
                   f"({_f(r['theoretical_speedup'])}x) | {_f(r['slim_speedup'])}x | {_f(r['ratio_to_slim'])} | "
                   f"{r.get('policy', '')} |")
    return out


def update_readme(readme: Path, rows: list[dict]) -> bool:
    """Rewrite README's gate table (the lines from :data:`README_GATE_HEAD` to the table's end) from ``rows``,
    atomically; False (nothing written) when README has no such table or it is already current."""
    from instaprune.core.io import atomic_write_text

    lines = readme.read_text().split("\n")
    if README_GATE_HEAD not in lines:
        return False
    start = end = lines.index(README_GATE_HEAD)
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    table = readme_gate_table(rows)
    if lines[start:end] == table:
        return False
    atomic_write_text(readme, "\n".join(lines[:start] + table + lines[end:]))
    return True


def _load_note(rows: list[dict]) -> list[str]:
    busy = [r for r in rows if r.get("procs_running", 0) > r["threads"] + 1]
    if not busy:
        return []
    top = max(r["procs_running"] for r in busy)
    return [f"**Measured under load**: {len(busy)} of {len(rows)} rows saw other runnable processes (up to {top} "
            "runnable on this 2-core machine while timing; two training runs occupied the cores). One-thread rows "
            "use CPU time (robust to waiting, not to shared caches and memory bandwidth): ratios are indicative, "
            "not the machine's idle latency.", ""]


def _meta_block(meta: dict) -> list[str]:
    lines = ["```", json.dumps(meta, indent=1), "```", ""]
    if meta.get("loaded") and "load_avg_at_start" in meta:
        lines += [f"**The machine was loaded** (load average {meta['load_avg_at_start'][0]:.2f} at start, "
                  f"{meta['load_avg_at_end'][0]:.2f} at end, on {meta['cores']} cores).", ""]
    elif meta.get("loaded"):
        lines += ["**Part of these rows was measured on a loaded machine** (see `parts` and each section).", ""]
    return lines


def render(meta: dict, rows: list[dict], out: Path) -> tuple[str, Path]:
    lines = ["# Engine latency (instaprune.engine vs the fastest dense model)", "", *_meta_block(meta),
             "Efficiency = measured speedup / theoretical speedup (dense MACs / (mask-required MACs + saliency "
             "overhead MACs), METHOD.md section 7). Dense = the fastest of eager and BN-folded, NCHW and "
             "channels_last, same threads, timed alternately with the dynamic model in the same process. "
             "Breakdown: saliency/gather/conv/other in ms (profiler fractions scaled to the median time). "
             "keep `floor`: every point keeps only its floor (min_keep) channels.", "",
             "## Goals", "", *goals(rows), ""]
    head = "| model | batch | thr | keep | dense | dense ms | dyn ms | speedup | theor. | eff. | " \
           "exec. red. | strategies | sal/gath/conv/other ms | auto/best |"
    lines += ["## Model level (forced independent masks; saliency paid)", "", head, "|" + "---|" * 14]
    for r in (r for r in rows if _posthoc(r)):
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {_keep(r)} | {r['dense_variant']} | "
                     f"{_f(r['dense_ms'])} | {_f(r['dynamic_ms'])} | {_f(r['measured_speedup'])} | "
                     f"{_f(r['theoretical_speedup'])} | {_f(r['efficiency'])} | "
                     f"{_f(r.get('executed_flops_reduction'), 3)} | {_strat(r)} | {_bd(r)} | "
                     f"{_f(r.get('auto_over_best'))} |")
    gate = [r for r in rows if _gate(r)]
    if gate:
        lines += ["", "## Predicted gates (method `gate`: forced per-image top-k masks, predictors paid)", "",
                  "Dense = the fastest dense form; slim = the statically slimmed model of the same MACs (the same k "
                  "channels per gate physically removed, fastest of its forms); dynamic = `to_dynamic` on the "
                  "gated plan (policy tuned on its first call: per-gate cost model `auto` or one strategy on every "
                  "gate, NCHW or channels_last). Masks: every image keeps k = round(keep x C) channels per gate, "
                  "drawn independently (synthetic budgets; study 2's real calibrated plans are timed by "
                  "`benchmarks/cifar10_gates.py latency`, their goal line is below).", "",
                  *_load_note(gate), *gate_goals(rows), "",
                  "| model | batch | thr | keep | dense ms | slim ms | dyn ms | speedup | theor. | eff. | slim "
                  "speedup | dyn/slim | policy | strategies | pred/gath/conv/other ms |", "|" + "---|" * 15]
        for r in gate:
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {_keep(r)} | {_f(r['dense_ms'])} | "
                         f"{_f(r['slim_ms'])} | {_f(r['dynamic_ms'])} | {_f(r['measured_speedup'])} | "
                         f"{_f(r['theoretical_speedup'])} | {_f(r['efficiency'])} | {_f(r['slim_speedup'])} | "
                         f"{_f(r['ratio_to_slim'])} | {r.get('policy', '')} | {_strat(r)} | {_bd(r)} |")
        lines += ["", "![gates: measured vs theoretical speedup](engine_latency_gates.png)", ""]
    real = [r for r in rows if r["level"] == "model-real"]
    if real:
        lines += ["", "## Real calibrated plans on real images (engine computes its own masks)", "",
                  f"Calibration: {real[0].get('calibration_data', '')}; timed: {real[0].get('timed_data', '')}.",
                  "", "| model | batch | thr | dense ms (p50/p90/p99) | dyn ms (p50/p90/p99) | speedup | theor. | "
                  "eff. | FLOPs red. | exec. red. | mask diffs / decisions | top-1 dense / ref / engine | "
                  "sal/gath/conv/other ms |", "|" + "---|" * 13]
        for r in real:
            def pct(d):
                return "/".join(f"{d[k]:.2f}" for k in ("p50", "p90", "p99")) if d else ""
            dl = pct(r.get("dense_latency_ms")) or _f(r["dense_ms"])
            yl = pct(r.get("dynamic_latency_ms")) or _f(r["dynamic_ms"])
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {dl} | {yl} | "
                         f"{_f(r['measured_speedup'])} | {_f(r['theoretical_speedup'])} | {_f(r['efficiency'])} | "
                         f"{_f(r['flops_reduction'], 3)} | {_f(r.get('executed_flops_reduction'), 3)} | "
                         f"{r['flips']} / {r['channel_decisions']} | {r['top1_dense']:.3f} / "
                         f"{r['top1_reference']:.3f} / {r['top1_engine']:.3f} | {_bd(r)} |")
    lines += ["", "## Layer level (one consumer conv; forced independent masks; saliency paid)", "",
              "| model | layer | batch | thr | keep | dense | dense ms | dyn ms | speedup | theor. | eff. "
              "| auto | best | auto/best | sal/gath/conv/other ms |", "|" + "---|" * 15]
    for r in (r for r in rows if r["level"] == "layer"):
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['threads']} | {_keep(r)} | "
                     f"{r['dense_variant']} | {_f(r['dense_ms'], 3)} | {_f(r['dynamic_ms'], 3)} | "
                     f"{_f(r['measured_speedup'])} | {_f(r['theoretical_speedup'])} | "
                     f"{_f(r['efficiency'])} | {r['strategy']} | {r.get('best_strategy', '')} | "
                     f"{_f(r.get('auto_over_best'))} | {_bd(r)} |")
    lines += ["", "## What limits the efficiency", "", *LIMITS]
    png = out.with_suffix(".png")
    _plot(rows, png)
    if gate:
        _plot_gates(gate, out.with_name(out.name + "_gates.png"))
    lines += ["", f"![efficiency]({png.name})", ""]
    return "\n".join(lines), png


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = list(dict.fromkeys(r["model"] for r in rows if _posthoc(r)))
    for ax, n in zip(axes, (1, 32), strict=True):
        for name in names:
            for t, style in ((1, "-o"), (2, "--s")):
                pts = sorted((r["keep"], r["efficiency"]) for r in rows if _posthoc(r)
                             and r["model"] == name and r["batch"] == n and r["threads"] == t and r["keep"] > 0)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{name} {t}t")
        ax.axhline(0.75 if n == 1 else 0.6, color="grey", lw=0.8, ls=":")
        ax.set_title(f"model level, batch {n} (dotted: goal at keep 0.5)")
        ax.set_xlabel("keep ratio")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency (measured / theoretical speedup)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_gates(rows: list[dict], png: Path) -> None:
    """Measured vs theoretical speedup of the gated engine (filled) and of the slim model (hollow), per batch;
    the diagonal is the theoretical limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.8), squeeze=False)
    names = list(dict.fromkeys(r["model"] for r in rows))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, n in zip(axes[0], batches, strict=True):
        top = 1.0
        for name in names:
            for t, m in ((1, "o"), (2, "s")):
                sel = sorted((r for r in rows if r["batch"] == n and r["model"] == name and r["threads"] == t),
                             key=lambda r: r["keep"])
                if not sel:
                    continue
                ax.plot([r["theoretical_speedup"] for r in sel], [r["measured_speedup"] for r in sel], "-" + m,
                        color=colors[name])
                ax.plot([r["slim_theoretical_speedup"] for r in sel], [r["slim_speedup"] for r in sel], "--" + m,
                        color=colors[name], mfc="none")
                top = max(top, *(max(r["theoretical_speedup"], r["slim_theoretical_speedup"],
                                     r["measured_speedup"]) for r in sel))
        ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", lw=0.8, ls=":")
        for name in names:
            ax.plot([], [], "o", color=colors[name], label=name)
        ax.plot([], [], "-o", color="k", label="dynamic (1 thread; squares: 2)")
        ax.plot([], [], "--o", color="k", mfc="none", label="slim, same MACs (dashed)")
        ax.set_xlim(0, top * 1.05)
        ax.set_ylim(0, top * 1.05)
        ax.set_title(f"predicted gates, batch {n} (dotted: measured = theoretical)")
        ax.set_xlabel("theoretical speedup (dense MACs / (MACs + predictor overhead))")
        ax.set_ylabel("measured speedup over the fastest dense model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
