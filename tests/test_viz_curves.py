"""Curves: ``zoo eval`` draws pr_curve.png (COCO) and cmc.png (re-id) beside its JSON, whose curve data agree
with its metrics; ``zoo train`` draws loss.png (and metrics.png when it validates) into its folder;
``--no-plots`` turns them off; validating does not change what is trained.
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from conftest import picture  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.eval.runner import evaluate  # noqa: E402
from zoo.hub import check_out_dir  # noqa: E402
from zoo.train import train  # noqa: E402
from zoo.viz.curves import average_precision_per_iou, plot_cmc, plot_loss, plot_metrics, plot_pr_curve  # noqa: E402
from zoo.viz.figure import figure_png  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_coco_eval_writes_a_pr_curve_that_agrees_with_its_ap(tiny_dataset, tmp_path):
    out = tmp_path / "detr" / "eval.json"
    result = evaluate("detr_irpe_mini", tiny_dataset("shapes-det"), out=out, progress=False)
    record = json.loads(out.read_text())
    assert set(record["plots"]) == {"pr_curve"} and record["plots"]["pr_curve"]["file"] == "pr_curve.png"
    picture(out.parent / "pr_curve.png")
    curve = record["curves"]["pr_curve"]
    assert len(curve["iou_thresholds"]) == 10 and len(curve["recall"]) == 101
    per_iou = average_precision_per_iou(curve)
    # COCO's AP is the mean precision over thresholds, recall points and categories: the curve's mean
    assert np.mean(per_iou) == pytest.approx(result.metrics["AP"], abs=1e-6)
    assert per_iou[0] == pytest.approx(result.metrics["AP50"], abs=1e-6)
    assert per_iou[5] == pytest.approx(result.metrics["AP75"], abs=1e-6)
    assert record["command"].startswith("python -m zoo eval detr_irpe_mini --data ")

    # --no-plots: the JSON still holds the curves, nothing is drawn
    bare = tmp_path / "bare" / "eval.json"
    assert main(["eval", "detr_irpe_mini", "--data", str(tiny_dataset("shapes-det")), "--out", str(bare), "--no-plots",
                 "--no-progress", "--limit", "4"]) == 0
    assert not (bare.parent / "pr_curve.png").exists()
    assert json.loads(bare.read_text())["plots"] == {}


def test_reid_eval_writes_cmc(tiny_dataset, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate("rga_sc_mini", tiny_dataset("shapes-reid"), out=out, progress=False)
    record = json.loads(out.read_text())
    cmc = record["curves"]["cmc"]
    assert cmc["cmc"][0] == pytest.approx(result.metrics["rank1"]) and cmc["mAP"] == pytest.approx(result.metrics["mAP"])
    assert all(a <= b + 1e-9 for a, b in zip(cmc["cmc"], cmc["cmc"][1:]))  # cumulative
    picture(tmp_path / "cmc.png")
    assert record["plots"]["cmc"]["file"] == "cmc.png"


def test_curve_figures_refuse_bad_data():
    with pytest.raises(ValueError, match="precision must be"):
        plot_pr_curve({"recall": [0, 1], "iou_thresholds": [0.5], "precision": [[1.0]]})
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_loss([])
    with pytest.raises(ValueError, match="equally long"):
        plot_cmc({"ranks": [1, 2], "cmc": [10.0]})
    with pytest.raises(ValueError, match="at least one metric"):
        plot_metrics({})
    # the same figure gives the same bytes (no timestamp in the PNG)
    assert figure_png(plot_loss([3.0, 2.0, 1.5])) == figure_png(plot_loss([3.0, 2.0, 1.5]))


CLS = dict(num_classes=10, width_div=16, heads=1, kernel_size=3)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_train_writes_loss_png_and_validation_curves(tiny_dataset, tmp_path):
    data = tiny_dataset("shapes-cls", "all")
    args = dict(epochs=2, batch_size=8, lr=1e-3, seed=0, limit=16, preprocessing={"input_size": [32, 32]}, log=None,
                **CLS)
    scores = []

    def validate(model):
        assert not model.training
        torch.rand(3)  # draws from torch's generator, as a DataLoader does
        scores.append(1)
        return {"top1": 10.0 * len(scores), "top5": 50.0}

    out = train("sasa_resnet26_convstem", data, tmp_path / "validated", validate=validate, **args)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["val_metrics_per_epoch"] == {"top1": [10.0, 20.0], "top5": [50.0, 50.0]}
    picture(out / "loss.png")
    picture(out / "metrics.png")
    plain = train("sasa_resnet26_convstem", data, tmp_path / "plain", plots=False, **args)
    assert not (plain / "loss.png").exists()
    # validating (the protocol's DataLoader draws from torch's generator) leaves the training run alone
    a, b = _weights(out), _weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_out_dir(out)  # a folder with its plots can be trained into again
    train("sasa_resnet26_convstem", data, out, **args)
    assert (out / "loss.png").is_file() and not (out / "metrics.png").exists()


def test_cli_train_validate(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset("shapes-cls", "all")
    out = tmp_path / "m"
    assert main(["train", "sasa_resnet_mini", "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "8", "--limit", "8", "--validate"]) == 0
    record = json.loads((out / "config.json").read_text())["train"]
    assert set(record["val_metrics_per_epoch"]) == {"top1", "top5"}
    assert "top1" in capsys.readouterr().out  # the epoch line shows the validation metrics
    picture(out / "metrics.png")
