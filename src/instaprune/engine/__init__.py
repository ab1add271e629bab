"""The fast dynamic engine: ``to_dynamic(model, points, plan)`` builds an eval-only model whose cost
follows each image's active channels (a gated plan: a :class:`GatedEngine`, ``_gated``); private modules hold
the graph rewrite, layers, kernels and cost model; ``bench`` times it. Tested against ``method.masked`` and
``method.gates.GatedModel`` (the references).
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "ENGINE_STRATEGIES": "dynamic",
    "DynamicModel": "dynamic",
    "GatedEngine": "dynamic",
    "GATE_STRATEGIES": "dynamic",
    "to_dynamic": "dynamic",
    "fold_dense": "dynamic",
    "CLOCKS": "bench",
    "clock_for": "bench",
    "time_alternating": "bench",
    "dense_models": "bench",
    "dense_candidates": "bench",
    "breakdown": "bench",
    "per_call_latency": "bench",
    "machine": "bench",
    "benchmark_plan": "bench",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
