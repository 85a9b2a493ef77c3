"""Look inside the models: attention maps of every family, training and evaluation curves, and a static
site of the zoo.

- :func:`attention_maps` (:mod:`zoo.viz.maps`): what each attention layer of a model computes for one
  input, as tensors;
- ``plot_*`` (:mod:`zoo.viz.plots`, :mod:`zoo.viz.curves`): matplotlib figures of them and of loss, metric,
  precision-recall and CMC curves; :func:`save_figure` writes one as PNG;
- :func:`visualize` (``python -m zoo visualize``): every figure of a model for one image or video, with
  an index.html;
- :func:`build_site` (``python -m zoo site``): the static zoo site.

Names load their module on first use, so importing ``zoo.viz`` costs nothing; drawing needs matplotlib
(the ``viz`` extra).
"""
import importlib

_HOMES = {
    "attention_maps": "zoo.viz.maps", "AttentionMaps": "zoo.viz.maps", "IRPEMaps": "zoo.viz.maps",
    "CrossMaps": "zoo.viz.maps", "Detections": "zoo.viz.maps", "RGAMaps": "zoo.viz.maps", "RSAMaps": "zoo.viz.maps",
    "RPAMaps": "zoo.viz.maps", "SASAMaps": "zoo.viz.maps", "bucket_map": "zoo.viz.maps", "rpe_table": "zoo.viz.maps",
    "input_image": "zoo.viz.plots", "input_frames": "zoo.viz.plots", "plot_input": "zoo.viz.plots",
    "plot_bucket_map": "zoo.viz.plots", "plot_rpe_tables": "zoo.viz.plots", "plot_cross_attention": "zoo.viz.plots",
    "plot_spatial_attention": "zoo.viz.plots", "plot_channel_attention": "zoo.viz.plots",
    "plot_relational_kernels": "zoo.viz.plots", "plot_affinity": "zoo.viz.plots",
    "plot_local_attention": "zoo.viz.plots",
    "plot_loss": "zoo.viz.curves", "plot_metrics": "zoo.viz.curves", "plot_pr_curve": "zoo.viz.curves",
    "plot_cmc": "zoo.viz.curves",
    "save_figure": "zoo.viz.figure", "figure_png": "zoo.viz.figure",
    "visualize": "zoo.viz.visualize", "build_site": "zoo.viz.site",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'zoo.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
