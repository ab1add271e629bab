"""Measuring and reporting: dense and dynamic top-1 and per-image FLOPs, metrics.json / report.md /
plots, and export (torch.export, ONNX). Imports ``core``, ``data``, ``method``.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "EvalResult": "accuracy",
    "evaluate": "accuracy",
    "accuracy_vs_flops": "accuracy",
    "write_metrics": "report",
    "write_plots": "report",
    "write_markdown": "report",
    "spearman": "report",
    "plot_difficulty_vs_flops": "report",
    "EXPORT_FORMATS": "export",
    "DATA_DEPENDENT_OPS": "export",
    "DynamicExport": "export",
    "ExportResult": "export",
    "onnx_missing": "export",
    "export_model": "export",
    "run_onnx": "export",
    "load_program": "export",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
