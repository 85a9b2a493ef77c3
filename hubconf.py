"""torch.hub entrypoints: one per registered RelZoo model, generated from the registry.

    model = torch.hub.load("<owner>/relzoo", "rga_sc_resnet50", num_classes=751)
    model = torch.hub.load(repo_dir, "detr_r50_irpe_product_ctx_9x9", source="local", pretrained=True)

Each entrypoint is ``zoo.create_model(name, pretrained=..., **kwargs)``; its docstring
(what ``torch.hub.help`` shows) is built from the model's config. Only the entrypoints are
public names here: torch.hub lists every public callable of this module.
"""
import zoo as _zoo
from zoo.registry import format_info as _format_info

dependencies = ["torch", "torchvision", "safetensors", "huggingface_hub", "yaml", "numpy"]


def _make_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return _zoo.create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{_format_info(name)}\n\n"
        f"Args:\n    pretrained: load the default weights entry (or pass weights='<tag>|path|url|hf://...').\n"
        f"    **kwargs: constructor overrides, as for zoo.create_model('{name}', ...).\n"
    )
    return entrypoint


for _name in _zoo.list_models():
    globals()[_name] = _make_entrypoint(_name)
del _name
