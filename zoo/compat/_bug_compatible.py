"""The one helper of :mod:`zoo.compat`: a layer class whose ``bug_compatible`` defaults to True."""
from __future__ import annotations

import inspect


def bug_compatible_by_default(cls: type, module: str, original: str) -> type:
    """A subclass of ``cls`` (same name, same arguments) whose ``bug_compatible`` defaults to True.

    ``module``: the compat module it is defined in; ``original``: the original's dotted name, for the docstring.
    """

    def __init__(self, *args, bug_compatible: bool = True, **kwargs):
        cls.__init__(self, *args, bug_compatible=bug_compatible, **kwargs)

    signature = inspect.signature(cls.__init__)  # help() shows the parent's arguments with the new default
    __init__.__signature__ = signature.replace(parameters=[
        p.replace(default=True) if p.name == "bug_compatible" else p for p in signature.parameters.values()])
    doc = (f"``{original}``: :class:`{cls.__module__}.{cls.__name__}` with ``bug_compatible=True`` by default "
           f"(the original's numbers; see the module docstring).\n\n" + (cls.__doc__ or ""))
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": doc, "__module__": module,
                                       "__qualname__": cls.__name__})
