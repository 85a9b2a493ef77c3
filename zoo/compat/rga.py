"""``RGA_Module`` of microsoft/Relation-Aware-Global-Attention-Networks
(``reid/models/models_utils/rga_modules.py``) on RelZoo's layer.

Change one line of code written for the original::

    from reid.models.models_utils.rga_modules import RGA_Module  ->  from zoo.compat.rga import RGA_Module

    att = RGA_Module(256, (256 // 4) * (128 // 4), use_spatial=True, use_channel=True,
                     cha_ratio=8, spa_ratio=8, down_ratio=8)       # as rga_branches.py builds rga_att1

Same arguments and state_dict keys as the original, same numbers (spec rga §1); the original has no
numerical bug in the module, so this is :class:`zoo.layers.rga.RGA_Module` itself (it only skips the
original's print on construction). The network-level quirks (spec rga §2-§3) belong to the models.
"""
from __future__ import annotations

from zoo.layers.rga import RGA_Module

__all__ = ["RGA_Module"]
