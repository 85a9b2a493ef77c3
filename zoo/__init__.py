"""RelZoo: relation- and relative-position-aware attention models for vision.

>>> import zoo
>>> zoo.list_models("rga_*")
>>> model = zoo.create_model("rga_sc_resnet50", num_classes=751)
>>> zoo.save_pretrained(model, "my_model"); zoo.from_pretrained("my_model")
"""
import importlib

__version__ = "0.1.0"
__all__ = ["create_model", "from_pretrained", "save_pretrained", "push_to_hub", "convert_checkpoint", "list_models",
           "model_info", "register_model", "__version__"]

# The public names load their module on first use (PEP 562): `python -m zoo` imports this
# package first, and its `--help` must not wait for torch.
_HOMES = {"create_model": "zoo.factory", "from_pretrained": "zoo.factory", "convert_checkpoint": "zoo.factory",
          "save_pretrained": "zoo.hub", "push_to_hub": "zoo.hub", "list_models": "zoo.registry",
          "model_info": "zoo.registry", "register_model": "zoo.registry"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
