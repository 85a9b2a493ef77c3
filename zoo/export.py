"""``zoo export NAME --out DIR``: a folder ready for the Hugging Face Hub, written by :func:`zoo.save_pretrained`.

The same layout ``zoo convert`` writes (model.safetensors, config.json, README.md model card), so
the folder loads with ``zoo.from_pretrained(DIR)`` or, once uploaded (``--push ORG/NAME``, or
``huggingface_hub.upload_folder``), ``zoo.from_pretrained('hf://ORG/NAME')``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from zoo.errors import ConfigError
from zoo.factory import create_model
from zoo.hub import push_to_hub, save_pretrained
from zoo.registry import model_info, split_name


def export_model(name: str, out_dir: Union[str, Path], weights: Optional[str] = None, *,
                 repo_id: Optional[str] = None, eval_results: Union[str, Path, None] = None, push: bool = False,
                 **overrides) -> Path:
    """Build ``name`` (``name.tag`` loads that tag's weights; random weights when the model has none)
    and write it to ``out_dir`` with :func:`zoo.save_pretrained` (``repo_id``: the Hub repo it is for;
    ``eval_results``: a ``zoo eval --out`` file for the card). ``push``: also upload it to ``repo_id``
    (:func:`zoo.push_to_hub`). Returns the folder."""
    base, tag = split_name(name)
    cfg = model_info(base)
    if push and not repo_id:
        raise ConfigError("push needs a repo_id (org/name) to upload to")
    pretrained = weights is None and (tag is not None or cfg.default_weights is not None)
    model = create_model(name, pretrained=pretrained, weights=weights, **overrides)
    folder = save_pretrained(model, out_dir, repo_id=repo_id, eval_results=eval_results)
    if push:
        push_to_hub(model, repo_id, eval_results=eval_results)
    return folder
