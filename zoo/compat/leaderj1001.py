"""leaderj1001/Stand-Alone-Self-Attention (``attention.py``, ``model.py``) on RelZoo's layers, bug for bug.

Change the import lines of code written for the original::

    from attention import AttentionConv, AttentionStem   ->  from zoo.compat.leaderj1001 import AttentionConv, AttentionStem
    from model import ResNet26, ResNet38, ResNet50       ->  from zoo.compat.leaderj1001 import ResNet26, ResNet38, ResNet50

    model = ResNet26(num_classes=10, stem=False)          # as main.py builds it
    model.load_state_dict(checkpoint['state_dict'])       # the original's checkpoints load unchanged

Same arguments, state_dict keys and initialisation as the original. What differs from
:mod:`zoo.layers.sasa` / :mod:`zoo.models.sasa_resnet`: ``bug_compatible`` defaults to True, which is
what the original computes and what its checkpoints were trained with (spec sasa §4, §8.2):

* attention with one softmax per channel (``groups`` has no effect), stride 1 only;
* in strided bottlenecks the 2x2 average pool after conv3 + BN (not right after the attention);
* the fixed 4x4 average pool before ``dense`` (so the ResNets take 32x32 inputs only).

The registered models ``sasa_resnet{26,38,50}_cifar`` are the same networks (``create_model(...,
bug_compatible=True)``), and ``python -m zoo convert`` records the flag for converted checkpoints.
"""
from __future__ import annotations

from typing import Sequence

from zoo.compat._bug_compatible import bug_compatible_by_default
from zoo.layers import sasa as _sasa
from zoo.models.sasa_resnet import LeaderBottleneck, SASACifarResNet

__all__ = ["AttentionConv", "AttentionStem", "Bottleneck", "Model", "ResNet26", "ResNet38", "ResNet50"]

AttentionConv = bug_compatible_by_default(_sasa.AttentionConv, __name__, "attention.AttentionConv")
AttentionStem = bug_compatible_by_default(_sasa.AttentionStem, __name__, "attention.AttentionStem")


class Bottleneck(LeaderBottleneck):
    """``model.Bottleneck(in_channels, out_channels, stride=1, groups=1, base_width=64)``: the original's block
    (width ``int(out_channels * base_width / 64) * groups``), bug-compatible.

    Shapes: (B, in_channels, H, W) -> (B, 4 * out_channels, H / stride, W / stride) (floor).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__(in_channels, out_channels, stride, bug_compatible=True,
                         width=int(out_channels * (base_width / 64.0)) * groups)


class Model(SASACifarResNet):
    """``model.Model(block, num_blocks, num_classes=1000, stem=False)``: the CIFAR ResNet with ``Bottleneck`` blocks
    (``stem=True``: the AttentionStem), bug-compatible. (B, 3, 32, 32) -> (B, num_classes)."""

    def __init__(self, block: type, num_blocks: Sequence[int], num_classes: int = 1000, stem: bool = False):
        if not (isinstance(block, type) and issubclass(block, LeaderBottleneck)):
            raise TypeError(f"Model builds its stages from Bottleneck blocks, got block={block!r}")
        super().__init__(tuple(num_blocks), num_classes=num_classes, stem="attention" if stem else "conv",
                         bug_compatible=True)


def ResNet26(num_classes: int = 1000, stem: bool = False) -> Model:  # noqa: N802 - the original's names
    """Blocks [1, 2, 4, 1]."""
    return Model(Bottleneck, [1, 2, 4, 1], num_classes=num_classes, stem=stem)


def ResNet38(num_classes: int = 1000, stem: bool = False) -> Model:  # noqa: N802
    """Blocks [2, 3, 5, 2]."""
    return Model(Bottleneck, [2, 3, 5, 2], num_classes=num_classes, stem=stem)


def ResNet50(num_classes: int = 1000, stem: bool = False) -> Model:  # noqa: N802
    """Blocks [3, 4, 6, 3]."""
    return Model(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, stem=stem)
