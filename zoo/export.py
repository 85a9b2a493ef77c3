"""``zoo export NAME --out DIR``: a folder ready for ``huggingface_hub.upload_folder``.

The same layout ``zoo convert`` writes (model.safetensors, config.json, README.md model
card), so the folder also loads with ``create_model(name, weights=DIR)`` or, once uploaded,
``create_model(name, weights='hf://org/repo')``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from zoo.factory import create_model
from zoo.hub import model_card, write_model_folder
from zoo.registry import model_info, split_name


def export_model(name: str, out_dir: Union[str, Path], weights: Optional[str] = None, **overrides) -> Path:
    """Build ``name`` (``name.tag`` loads that tag's weights; random weights when the model has none)
    and write it to ``out_dir``. Returns the folder."""
    base, tag = split_name(name)
    cfg = model_info(base)
    pretrained = weights is None and (tag is not None or cfg.default_weights is not None)
    model = create_model(name, pretrained=pretrained, weights=weights, **overrides)
    kwargs = {**cfg.kwargs, **overrides}
    entry = cfg.weights.get(tag or cfg.default_weights or "") if weights is None else None
    source = weights or (entry.source if entry else "random initialisation")
    config = {"model": base, "kwargs": kwargs, "source": source}
    if entry is not None and entry.sha256:
        config["source_sha256"] = entry.sha256
    origin = (f"Exported by RelZoo from `{source}`." if entry or weights
              else "Exported by RelZoo with random weights (no published weights for this model).")
    return write_model_folder(out_dir, model.state_dict(), config, model_card(base, config, origin))
