"""``instaprune demo``: the whole method on a generated dataset, no files needed.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "DEMO_RECIPE": "run",
    "DEMO_TARGET": "run",
    "DemoSchedule": "run",
    "run_demo": "run",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
