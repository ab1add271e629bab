"""Latency measurement of the dynamic engine against the fastest honest dense model (docs/method.md section 8).

Used by ``benchmarks/engine_latency.py`` and the ``instaprune benchmark`` command:

- :func:`dense_candidates`: the model as given (eager) and BN-folded (``fold_dense``), each in NCHW and
  channels_last; :func:`time_alternating` picks the fastest (the dense side of every comparison).
- :func:`time_alternating`: ``torch.utils.benchmark.Timer`` on every function in turn, ``pairs`` rounds
  (dense and dynamic alternate, so load drifts hit both alike); per round ``number`` calls, per-call time.
  Clock ``cpu`` (``time.process_time``) for one thread is robust to other processes taking the core;
  ``wall`` for more threads (CPU time would add the threads up).
- :func:`breakdown`: torch.profiler over a few forwards with the engine's scopes on; the forward's time split
  into saliency (norms + thresholds, scope ``instaprune.saliency``), gather (everything but convolutions and
  GEMMs inside the sparse scope: index_select, masking, scatter, concatenation), conv (every convolution and
  GEMM of the model, dense layers included) and other (pools, adds, activations, Python), as fractions.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.engine._gated import GatedConv2d
from instaprune.engine._linear import DynamicLinear
from instaprune.engine._modules import DynamicConv2d
from instaprune.engine.dynamic import DynamicModel, fold_dense, to_dynamic
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport

__all__ = ["CLOCKS", "clock_for", "num_threads", "time_alternating", "fastest", "dense_models", "dense_candidates",
           "breakdown", "per_call_latency", "machine", "benchmark_plan", "slim_gates", "slim_of_plan"]

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_CONV_OPS = ("conv", "addmm", "aten::mm", "aten::bmm", "embedding_bag", "aten::linear", "aten::matmul")


def clock_for(threads: int, clock: str = "auto") -> str:
    if clock not in ("auto", *CLOCKS):
        raise ConfigError(f"clock must be auto, cpu or wall, got {clock!r}")
    return ("cpu" if threads == 1 else "wall") if clock == "auto" else clock


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What a timing depends on: versions, CPU, cores, threads, load and the UTC date of the run."""
    from instaprune import __version__

    return {"instaprune": __version__, "torch": torch.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "load_avg": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _quiet_cpu_only(name: str):
    """On a CUDA build of torch without a CUDA runtime (a CPU machine), two torch components print GPU noise that
    says nothing about CPU timing: importing ``torch.utils.benchmark`` imports ``torch.utils.cpp_extension``, which
    logs "No CUDA runtime is found, using CUDA_HOME=...", and the profiler (Kineto) prints its GPU probe
    ("gpuGetDeviceCount failed with code 35") and start/stop lines. Where torch allows it, silence them: the
    ``torch.utils.cpp_extension`` logger is raised to ERROR while it is imported, and Kineto's log level is set
    above its errors through ``KINETO_LOG_LEVEL`` (unless the user set it). With CUDA available, nothing changes."""
    import logging

    @contextlib.contextmanager
    def quiet():
        if torch.cuda.is_available():
            yield
            return
        if name == "kineto":
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            yield
            return
        lg = logging.getLogger("torch.utils.cpp_extension")
        old = lg.level
        lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            lg.setLevel(old)

    return quiet()


def _timer():
    """``torch.utils.benchmark.Timer``, imported on first use (without the CUDA-probe log line on CPU machines)."""
    with _quiet_cpu_only("cpp_extension"):
        from torch.utils.benchmark import Timer
    return Timer


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the ``with`` block, the previous count restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def time_alternating(fns: dict[str, Callable[[], Any]], pairs: int = 7, threads: int = 1, clock: str = "auto",
                     min_seconds: float = 0.05) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, measured round-robin ``pairs`` times (after one warm-up)."""
    timer = CLOCKS[clock_for(threads, clock)]
    Timer = _timer()  # noqa: N806
    with num_threads(threads):
        numbers = {}
        for name, f in fns.items():
            f()
            t0 = time.perf_counter()
            f()
            numbers[name] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        out: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(pairs):
            for name, f in fns.items():
                t = Timer("f()", globals={"f": f}, num_threads=threads, timer=timer)
                out[name].append(t.timeit(numbers[name]).median * 1e3)
    return out


def fastest(fns: dict[str, Callable[[], Any]], pairs: int = 2, threads: int = 1, clock: str = "auto",
            min_seconds: float = 0.05) -> tuple[str, dict[str, float]]:
    """The name of the fastest of ``fns`` (:func:`time_alternating` medians) and every median (ms): how the dense
    side of a comparison, or a slim yardstick, picks its form."""
    t = time_alternating(fns, pairs, threads, clock, min_seconds)
    medians = {k: statistics.median(v) for k, v in t.items()}
    return min(medians, key=medians.__getitem__), medians


def dense_models(model: nn.Module, points: PointReport) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The dense model in four forms, each a function of an NCHW input (channels_last forms convert it inside,
    as the engine does): eager / BN-folded (``fold_dense``) x NCHW / channels_last."""
    model = model.eval()
    eager_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded, folded_cl = fold_dense(model, points), fold_dense(model, points, channels_last=True)

    def eager(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return model(x)

    def eager_channels_last(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return eager_cl(x.contiguous(memory_format=torch.channels_last))

    return {"eager_nchw": eager, "eager_cl": eager_channels_last, "folded_nchw": folded,
            "folded_cl": folded_cl}


def dense_candidates(model: nn.Module, points: PointReport, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """:func:`dense_models` as closures on ``x`` (for :func:`time_alternating`)."""
    return {name: (lambda f=f: f(x)) for name, f in dense_models(model, points).items()}


def breakdown(engine: DynamicModel | nn.Module, x: torch.Tensor, reps: int = 3,
              run: Callable[[], Any] | None = None) -> dict[str, float]:
    """Fractions of the forward's time spent in saliency / gather / conv / other (see module docs)."""
    from torch.profiler import ProfilerActivity, profile

    layers = [m for m in engine.modules() if isinstance(m, (DynamicConv2d, DynamicLinear, GatedConv2d))]
    ctxs = list({id(c): c for c in (m._ctx if isinstance(m, GatedConv2d) else m.ctx for m in layers)}.values())
    run = run or (lambda: engine(x))
    for c in ctxs:
        c.profile = True
    try:
        run()
        with _quiet_cpu_only("kineto"), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            total = (time.perf_counter() - t0) * 1e6
    finally:
        for c in ctxs:
            c.profile = False
    sal = gather = conv = 0.0
    for ev in prof.events():
        if ev.name == "instaprune.saliency":
            sal += ev.cpu_time_total
            continue
        if not ev.name.startswith("aten::"):
            continue
        scope, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("instaprune."):
                scope = parent.name
                break
            if parent.name.startswith("aten::"):  # only top-level aten ops carry self time we count
                scope = "nested"
                break
            parent = parent.cpu_parent
        if scope in ("nested", "instaprune.saliency"):
            continue
        t = ev.cpu_time_total
        if any(k in ev.name for k in _CONV_OPS):
            conv += t
        elif scope == "instaprune.sparse":
            gather += t
    parts = {"saliency": sal, "gather": gather, "conv": conv}
    parts["other"] = max(total - sum(parts.values()), 0.0)
    s = sum(parts.values()) or 1.0
    return {k: v / s for k, v in parts.items()}


def per_call_latency(fns: dict[str, Callable[[torch.Tensor], Any]], inputs: list[torch.Tensor],
                     threads: int = 1, clock: str = "auto") -> dict[str, dict[str, float]]:
    """Per-input latency (ms) of each function, alternating functions on every input; p50/p90/p99/mean."""
    timer = CLOCKS[clock_for(threads, clock)]
    times: dict[str, list[float]] = {n: [] for n in fns}
    with num_threads(threads):
        for f in fns.values():
            f(inputs[0])
        for x in inputs:
            for name, f in fns.items():
                t0 = timer()
                f(x)
                times[name].append((timer() - t0) * 1e3)
    out = {}
    for name, v in times.items():
        q = statistics.quantiles(v, n=100, method="inclusive") if len(v) > 1 else [v[0]] * 99
        out[name] = {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(v), "n": len(v)}
    return out


def benchmark_plan(model: nn.Module, points: PointReport, plan: Plan | None, inputs: torch.Tensor,
                   batch_sizes: Sequence[int] = (1, 32), threads: Sequence[int] = (1,), pairs: int = 7,
                   clock: str = "auto", max_images: int = 200) -> list[dict[str, Any]]:
    """Dense (fastest of :func:`dense_models`) vs ``to_dynamic(model, points, plan)`` on real ``inputs``.

    Batch 1: every image (up to ``max_images``) in turn, dense and dynamic alternating; p50/p90/p99/mean.
    Larger batches: the first ``b`` inputs, :func:`time_alternating` medians. Each row: dense/dynamic ms,
    measured and theoretical speedup, efficiency, FLOPs reductions (required and executed), strategies and
    the time breakdown."""
    if pairs < 1:
        raise ConfigError(f"pairs must be >= 1, got {pairs}")
    engine = to_dynamic(model, points, plan)
    dense = dense_models(model, points)
    slim: dict[str, Callable[[torch.Tensor], Any]] = {}
    if plan is not None and plan.gates is not None:  # the yardstick of a gated plan: the same MACs, slimmed
        from instaprune.method.points import find_prune_points

        sm, _ = slim_of_plan(model, plan, inputs)
        slim = dense_models(sm, find_prune_points(sm, inputs[:1]))
    rows = []
    for t in threads:
        for b in batch_sizes:
            if b > inputs.shape[0]:
                raise ConfigError(f"batch {b} needs at least {b} inputs, got {inputs.shape[0]}")
            first = inputs[:b]
            best, pick = fastest({k: (lambda f=f, x=first: f(x)) for k, f in dense.items()}, 2, t, clock)
            row: dict[str, Any] = {"batch": b, "threads": t, "dense_variant": best,
                                   "clock": clock_for(t, clock), "dense_candidates_ms": pick}
            sbest = None
            if slim:
                sbest, _ = fastest({k: (lambda f=f, x=first: f(x)) for k, f in slim.items()}, 2, t, clock)
                row["slim_variant"] = sbest
            if b == 1:
                images = [inputs[i:i + 1] for i in range(min(max_images, inputs.shape[0]))]
                engine.warmup(images[0])  # the batch-1 layout is chosen before any timing
                fns1 = {"dense": dense[best], "dynamic": engine, **({"slim": slim[sbest]} if sbest else {})}
                lat = per_call_latency(fns1, images, t, clock)
                row.update(dense_latency_ms=lat["dense"], dynamic_latency_ms=lat["dynamic"],
                           dense_ms=lat["dense"]["mean"], dynamic_ms=lat["dynamic"]["mean"])
                if sbest:
                    row.update(slim_latency_ms=lat["slim"], slim_ms=lat["slim"]["mean"])
                summaries = []
                for x in images:
                    engine(x)
                    summaries.append(engine.summary())
            else:
                engine.warmup(first)  # auto's tuning settles before any timing
                fns = {"dense": lambda f=dense[best], x=first: f(x), "dynamic": lambda x=first: engine(x)}
                if sbest:
                    fns["slim"] = lambda f=slim[sbest], x=first: f(x)
                tm = time_alternating(fns, pairs, t, clock)
                row.update({f"{k}_ms": statistics.median(v) for k, v in tm.items()})
                engine(first)
                summaries = [engine.summary()]
            for key in ("theoretical_speedup", "flops_reduction", "executed_flops_reduction"):
                row[key] = statistics.fmean(s[key] for s in summaries)
            row["strategies"] = summaries[-1]["strategies"]
            row["measured_speedup"] = row["dense_ms"] / row["dynamic_ms"]
            row["efficiency"] = row["measured_speedup"] / row["theoretical_speedup"]
            if sbest:  # the physical limit: how close the engine comes to the slimmed model of the same MACs
                row["slim_speedup"] = row["dense_ms"] / row["slim_ms"]
                row["ratio_to_slim"] = row["dynamic_ms"] / row["slim_ms"]
            frac = breakdown(engine, first, reps=1)
            row["breakdown_ms"] = {k: v * row["dynamic_ms"] for k, v in frac.items()}
            rows.append(row)
    return rows


@torch.inference_mode()
def slim_of_plan(model: nn.Module, plan: Plan, inputs: torch.Tensor, chunk: int = 64) -> tuple[nn.Module, dict]:
    """The physical limit of a gated ``plan`` on ``inputs``: :func:`slim_gates` with every gate at its mean kept
    fraction over ``inputs`` (the reference gated model's own predictions: per-image budgets of threshold plans
    averaged). Returns the slim model and the fractions."""
    from instaprune.method.gates import channel_usage, find_gates, gated_from_plan

    if plan.gates is None:
        raise ConfigError("slim_of_plan needs a gated plan")
    ref = gated_from_plan(model.eval(), find_gates(model, inputs[:1]), plan.gates)
    try:
        keep = {n: float(u.mean()) for n, u in channel_usage(ref, [(x,) for x in inputs.split(chunk)]).items()}
        return slim_gates(model, ref.gates, keep, plan.gates.config.min_keep), keep
    finally:
        ref.remove()


def slim_gates(model: nn.Module, gates: Any, keep: dict[str, float], min_keep: float = 0.05) -> nn.Module:
    """The statically slimmed yardstick of a gated plan: a copy of ``model`` (predictors dropped) in which every
    gate's tensor has ``k = max(floor, round(keep * C))`` channels physically (the producers' output filters,
    the BatchNorms on the chain, the depthwise channels and the consumer's input channels removed): the same
    MACs as the gated model's top-k budget, without any gather. Which k channels stay does not matter for
    timing (the first k). Grouped (non-depthwise) convs on a chain are not supported (ResNeXt)."""
    from torch import fx

    from instaprune.method.gates import GATES_ATTR

    new = copy.deepcopy(model).eval()
    if hasattr(new, GATES_ATTR):
        delattr(new, GATES_ATTR)
    gm = fx.symbolic_trace(new)
    mods = dict(new.named_modules())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    cin: dict[str, int] = {}
    cout: dict[str, int] = {}
    bns: dict[str, int] = {}
    for s in gates:
        k = max(1, min(s.channels, math.ceil(min_keep * s.channels)), min(s.channels, round(keep[s.name] * s.channels)))
        cin[s.name] = k
        for p in s.producers:
            cout[p] = k
        cur = nodes[s.name].args[0]
        while not (cur.op == "call_module" and cur.target == s.producers[0]):
            if cur.op == "call_module" and isinstance(mods[cur.target], nn.BatchNorm2d):
                bns[cur.target] = k
            cur = cur.args[0]
    for name in set(cin) | set(cout):
        c = mods[name]
        dw = c.groups > 1 and c.groups == c.in_channels == c.out_channels
        if c.groups > 1 and not dw:
            raise ConfigError(f"slim_gates: grouped conv {name!r} on a gated chain is not supported")
        ko = cout.get(name, c.out_channels)
        ki = ko if dw else cin.get(name, c.in_channels)
        nc = nn.Conv2d(ki, ko, c.kernel_size, c.stride, c.padding, c.dilation, ko if dw else 1,
                       bias=c.bias is not None)
        with torch.no_grad():
            nc.weight.copy_(c.weight[:ko] if dw else c.weight[:ko, :ki])
            if c.bias is not None:
                nc.bias.copy_(c.bias[:ko])
        _set_module(new, name, nc)
    for name, k in bns.items():
        b = mods[name]
        nb = nn.BatchNorm2d(k, b.eps, b.momentum, b.affine, b.track_running_stats).eval()
        with torch.no_grad():
            for a in ("weight", "bias", "running_mean", "running_var"):
                if getattr(b, a, None) is not None:
                    getattr(nb, a).copy_(getattr(b, a)[:k])
        _set_module(new, name, nb)
    return new.eval()


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
