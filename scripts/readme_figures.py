"""Draw README's pictures: one visualisation per family, from the RelZoo-mini models and their committed
weights, on the first validation sample of each one's synthetic dataset (generated with seed 0).

    python scripts/readme_figures.py                     # writes docs/figures/<family>.png
    python scripts/readme_figures.py --families rga --out /tmp/figures

Each picture is the figure ``zoo visualize`` draws for that family's mechanism (:data:`FIGURES`), copied
from a visualisation folder made in a temporary directory.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import zoo
from zoo.data.synthetic import make_dataset
from zoo.viz.visualize import visualize

ROOT = Path(__file__).resolve().parents[1]

#: family -> (mini model, synthetic dataset kind, the file of its visualisation README shows, point)
FIGURES = {
    "irpe": ("detr_irpe_mini", "shapes-det", "cross_attention.png", (0.5, 0.5)),
    "rga": ("rga_sc_mini", "shapes-reid", "spatial_attention.png", (0.5, 0.5)),
    "rsa": ("rsanet_mini", "moving-shapes", "relational_kernels_base_model_layer1_0_conv2.png", (0.5, 0.5)),
    "rpa": ("handraise_rpa_mini", "raised-hands", "affinity_backbone_bfp_refine.png", (0.45, 0.5)),
    "sasa": ("sasa_resnet_mini", "shapes-cls", "local_attention_layer2_0_conv2.png", (0.5, 0.5)),
}


def first_input(kind: str, root: Path) -> dict:
    """The first validation sample of a tiny generated dataset: ``{"image": file}`` or ``{"video": folder}``."""
    data = make_dataset(kind, root / kind, split="val", seed=0, size="tiny")
    if kind == "moving-shapes":
        frames = sorted(data.rglob("img_00001.jpg"))
        return {"video": frames[0].parent}
    if kind == "shapes-reid":
        return {"image": sorted((data / "query").glob("*.jpg"))[0]}
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and "val" in str(p.parent))
    return {"image": images[0]}


def draw(family: str, out: Path, work: Path) -> Path:
    name, kind, file, point = FIGURES[family]
    model = zoo.create_model(name, pretrained=True)
    folder = visualize(model, name, work / name, point=point, **first_input(kind, work / "data")).parent
    target = out / f"{family}.png"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / file, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="folder of the pictures")
    parser.add_argument("--families", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="relzoo-figures-") as work:
        for family in args.families:
            print(f"wrote {draw(family, Path(args.out), Path(work))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
