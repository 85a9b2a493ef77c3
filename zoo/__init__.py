"""RelZoo: relation- and relative-position-aware attention models for vision.

>>> import zoo
>>> zoo.list_models("rga_*")
>>> model = zoo.create_model("rga_sc_resnet50", num_classes=751)
"""
from zoo.factory import convert_checkpoint, create_model
from zoo.registry import list_models, model_info, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "convert_checkpoint", "list_models", "model_info", "register_model", "__version__"]
