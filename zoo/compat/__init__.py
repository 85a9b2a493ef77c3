"""The originals' public APIs under their own names, bug for bug by default.

One module per original project; code written against an original runs on RelZoo's layers with
only its import line changed:

=====================================  ================================================================
original import                        RelZoo
=====================================  ================================================================
``import rpa_sa`` (inspiros/rpa_sa)    ``from zoo.compat import rpa_sa`` (also registers ``torch.ops.rpa_sa.*``)
``import irpe`` (microsoft/Cream iRPE)  ``from zoo.compat import irpe``
the fastai notebook's module           ``from zoo.compat.sasa_notebook import RelativeSelfAttention``
``from attention import ...`` /        ``from zoo.compat.leaderj1001 import AttentionConv, ResNet26, ...``
``from model import ...`` (leaderj1001)
``from reid.models.models_utils.rga_modules import RGA_Module``  ``from zoo.compat.rga import RGA_Module``
``from ops.rsa import RSA`` (KimManjin/RSA)  ``from zoo.compat.rsa import RSA``
=====================================  ================================================================

The difference from :mod:`zoo.layers`: there, where an original has a bug, the default is the
corrected behaviour and ``bug_compatible=True`` reproduces the bug; here ``bug_compatible`` defaults
to True, so the numbers (and the weights trained with them) are the original's. Each module's
docstring lists what that means for its layers. Crashes of the originals are not reproduced.

The submodules are imported on demand (``from zoo.compat import rpa_sa``); this package imports nothing.
"""
