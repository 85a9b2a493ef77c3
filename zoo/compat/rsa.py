"""``RSA`` of KimManjin/RSA (``ops/rsa.py``) on RelZoo's layer.

Change one line of code written for the original::

    from ops.rsa import RSA   ->  from zoo.compat.rsa import RSA

    rsa = RSA(d_in=planes, d_out=planes, nh=8, dk=0, dv=0, dd=0, kernel_size=(5, 7, 7), stride=(1, 1, 1),
              kernel_type='VplusR', feat_type='VplusR')    # as ops/ResNet.py builds its RSA blocks

Same arguments, parameter names and state_dict order as the original, same numbers (spec rsa §1,
including the value-major output channel order); the original has no numerical bug in the layer, so
this is :class:`zoo.layers.rsa.RSA` itself (it only skips the original's print on construction).
"""
from __future__ import annotations

from zoo.layers.rsa import RSA

__all__ = ["RSA"]
