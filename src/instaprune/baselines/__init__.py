"""Methods we compare against: static L1-norm filter pruning (``slim`` removes channels for real).
Imports ``core`` and ``method``.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "BlockPair": "static",
    "StaticPlan": "static",
    "find_pairs": "static",
    "l1_scores": "static",
    "static_plan": "static",
    "apply_masks": "static",
    "slim": "static",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
