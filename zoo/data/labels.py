"""Class names by class id: the label sets of the datasets RelZoo reads and generates.

A weights entry's ``label_names`` (:class:`zoo.config.WeightsEntry`) is either a list of names or
the name of one of these sets; :func:`label_names` resolves both. Each set is indexed by the class
id the model predicts:

============== ==========================================================================
set            ids
============== ==========================================================================
coco           DETR's 91 ids 0..90 (COCO's category ids; 'N/A' for the ids COCO skips)
imagenet       ImageNet-1k's 1000 classes in label order (sorted WordNet ids; torchvision's names)
shapes-det     0 'N/A', 1 circle, 2 square, 3 triangle (DETR ids = the dataset's category ids)
raised-hands   0 background, 1 hand-raising (a torchvision detector's labels)
shapes-cls     the 10 shapes in label order (sorted class folders)
moving-shapes  the 8 temporal-order classes in label order
============== ==========================================================================

The names themselves live with their datasets (:mod:`zoo.data.coco`, :mod:`zoo.data.synthetic`;
ImageNet's are torchvision's, from its weights' metadata).
"""
from __future__ import annotations

import difflib
from typing import Optional, Sequence, Union

from torchvision.models import ResNet50_Weights

from zoo.data.coco import COCO_CLASSES
from zoo.data.synthetic import CLS_CLASSES, DET_CATEGORIES, HAND_CATEGORIES, VIDEO_CLASSES
from zoo.errors import ConfigError

__all__ = ["LABEL_SETS", "label_names", "names_by_category_id"]


def names_by_category_id(categories: Sequence[dict], unused: str = "N/A") -> tuple[str, ...]:
    """COCO-style ``[{"id", "name"}, ...]`` -> names indexed by id 0..max id (``unused`` where no category has the id)."""
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    return tuple(by_id.get(i, unused) for i in range(max(by_id) + 1))


#: Label set name -> class names by class id.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "coco": tuple(COCO_CLASSES),
    "imagenet": tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]),
    "shapes-det": names_by_category_id(DET_CATEGORIES),
    "raised-hands": names_by_category_id(HAND_CATEGORIES, unused="background"),
    "shapes-cls": tuple(CLS_CLASSES),
    "moving-shapes": tuple(VIDEO_CLASSES),
}


def label_names(spec: Union[str, Sequence[str], None]) -> Optional[tuple[str, ...]]:
    """A weights entry's ``label_names`` as names by class id: a label set's name is looked up in
    :data:`LABEL_SETS`, a list is kept, None stays None. An unknown set is a ConfigError naming it."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return tuple(spec)
    if spec not in LABEL_SETS:
        close = difflib.get_close_matches(spec, list(LABEL_SETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown label set '{spec}' (known: {', '.join(LABEL_SETS)}){hint}")
    return LABEL_SETS[spec]
