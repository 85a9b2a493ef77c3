"""RPA family models: the rpa_sa CIFAR toy (converted from the original's .pt) and the hand-raising detector."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from conftest import fixture_dir, load_case
from zoo.checkpoint import load_checkpoint
from zoo.factory import convert_checkpoint
from zoo.models.handraise import BalancedFeaturePyramid, HandRaiseRCNN


# ---- the CIFAR toy network ----

def _check_toy(model, meta, t):
    tol_out, tol_grad = meta["tolerance"]["output"], meta["tolerance"]["grads"]
    x = t["input"].clone().requires_grad_()
    out = model(x)
    torch.testing.assert_close(out, t["output"], **tol_out)
    (out * t["grad_output"]).sum().backward()
    torch.testing.assert_close(x.grad, t["grad_input"], **tol_grad)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, t[f"grad_{name}"], **tol_grad, msg=lambda m: f"grad_{name}: {m}")


def test_toy_converts_from_original_checkpoint_and_matches(tmp_path):
    meta, t = load_case("rpa", "toy_cifar_rpanet")
    src = fixture_dir("rpa") / "toy_cifar_rpanet.pt"
    out_dir = convert_checkpoint(src, out_dir=tmp_path / "toy")  # a bare state dict: map and model detected
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["model"], config["converter"]) == ("rpa_cifar_toy", "rpa-toy")
    assert config["kwargs"]["bug_compatible"] is True  # the original's behaviour, recorded with its weights
    model = zoo.create_model("rpa_cifar_toy", weights=str(out_dir))
    assert not model.training and model.nl1[0].bug_compatible
    _check_toy(model, meta, t)


def test_toy_loads_the_bare_state_dict_directly_and_in_bug_compatible_mode():
    meta, t = load_case("rpa", "toy_cifar_rpanet")
    state = load_checkpoint(fixture_dir("rpa") / "toy_cifar_rpanet.pt")
    assert set(state) == set(meta["checkpoint"]["keys"])
    # The original's own spelling: 'lerp', which its op ran as nearest.
    model = zoo.create_model("rpa_cifar_toy", rpa_interpolation="lerp", bug_compatible=True)
    model.load_state_dict(state)
    _check_toy(model.eval(), meta, t)
    # With the fixed meaning of 'lerp' (= 'alerp') the same weights give other numbers.
    fixed = zoo.create_model("rpa_cifar_toy", rpa_interpolation="lerp")
    fixed.load_state_dict(state)
    assert not torch.allclose(fixed.eval()(t["input"]), t["output"], rtol=1e-3, atol=1e-4)


# ---- the hand-raising detector ----

SMALL = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)


def test_balanced_feature_pyramid_shapes_and_residual():
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    feats = [torch.randn(2, 8, *s) for s in sizes]
    out = BalancedFeaturePyramid(refine=None)(feats)
    assert [tuple(o.shape[-2:]) for o in out] == sizes
    # with a zero refine the residual leaves every level unchanged
    zero = BalancedFeaturePyramid(refine=torch.nn.Conv2d(8, 8, 1))
    torch.nn.init.zeros_(zero.refine.weight), torch.nn.init.zeros_(zero.refine.bias)
    for a, b in zip(zero(feats), feats):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="5 levels"):
        BalancedFeaturePyramid()(feats[:4])


@pytest.mark.parametrize("name,mode", [("handraise_rcnn_r50_fpn_rpa_position", "relative_position")])
def test_detector_trains_with_torchvision_losses_and_evaluates(name, mode):
    torch.manual_seed(0)
    model = zoo.create_model(name, **SMALL)
    refine = model.backbone.bfp.refine
    assert refine.rpa_mode == mode and refine.kernel_size == (3, 3)      # locality: 3x3 embedding
    assert model.roi_heads.box_predictor.cls_score.out_features == 2     # background + hand-raising

    images = [torch.rand(3, 64, 80), torch.rand(3, 60, 72)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 10.0, 60.0, 50.0], [5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1, 1])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.zero_grad()
    total.backward()
    # the RPA refine block is in the graph: its relative tables get gradients
    assert refine.a_k[0].grad is not None and refine.a_v[0].grad is not None
    assert refine.embed_conv[0].weight.grad.abs().sum() > 0
    before = refine.embed_conv[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, refine.embed_conv[0].weight)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}
    # the COCO adapter rescales boxes to the original image size (here twice the input)
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        plain = model(images)
        scaled = model.coco_predictions(images, torch.tensor([[128, 160], [120, 144]]))
    torch.testing.assert_close(scaled[0]["boxes"], plain[0]["boxes"] * 2)
    torch.testing.assert_close(scaled[1]["scores"], plain[1]["scores"])


def test_detector_variants_and_config():
    distance = zoo.create_model("handraise_rcnn_r50_fpn_rpa_distance", locality=False, **SMALL)
    refine = distance.backbone.bfp.refine
    assert refine.rpa_mode == "relative_distance" and refine.rpa_kernel_size == (6,) and refine.kernel_size == (1, 1)
    # trainable_backbone_layers follows torchvision: 3 trains layer2..layer4 only
    frozen = HandRaiseRCNN(trainable_backbone_layers=3, **SMALL).backbone.body
    assert not frozen.conv1.weight.requires_grad and not frozen.layer1[0].conv1.weight.requires_grad
    assert frozen.layer2[0].conv1.weight.requires_grad
    for name in ("handraise_rcnn_r50_fpn_rpa_distance", "handraise_rcnn_r50_fpn_rpa_position"):
        info = zoo.model_info(name)
        assert info.eval["protocol"] == "coco" and info.task == "detection"
        assert info.weights == {} and "No public weights" in info.notes
        assert info.reported and all(r.weights is None for r in info.reported)


def test_smaller_network_options():
    """Reduced ResNet / FPN width, custom anchors and box head (as handraise_rpa_mini uses them)."""
    model = HandRaiseRCNN(backbone_layers=[1, 1, 1, 1], backbone_width_div=16, fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128],
                          representation_size=64, frozen_bn=False, min_size=64, max_size=96)
    backbone = model.backbone
    assert backbone.out_channels == 32 and isinstance(backbone.body.bn1, torch.nn.BatchNorm2d)
    assert [len(stage) for stage in backbone.body.stages] == [1, 1, 1, 1]
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.roi_heads.box_head.fc7.out_features == 64 and model.roi_heads.box_predictor.cls_score.out_features == 2
    model.eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
        assert [tuple(f.shape[1:]) for f in features.values()] == [(32, 16, 24), (32, 8, 12), (32, 4, 6), (32, 2, 3), (32, 1, 2)]
        assert set(model([torch.rand(3, 60, 90)])[0]) == {"boxes", "labels", "scores"}
    with pytest.raises(ValueError, match="one size per pyramid level"):
        HandRaiseRCNN(anchor_sizes=[8, 16], **SMALL)
    with pytest.raises(ValueError, match="full ResNet-50"):
        HandRaiseRCNN(backbone_layers=[1, 1, 1, 1], pretrained_backbone=True)


def test_detector_through_the_coco_protocol(tmp_path):
    """COCO-format hand-raising data -> coco protocol -> AP, on two tiny synthetic images."""
    import dataclasses
    import inspect
    import json

    from PIL import Image

    from zoo.eval.protocol import get_protocol

    protocol_cls = get_protocol("coco")
    if "coco_predictions" not in inspect.getsource(protocol_cls.predict):
        pytest.skip("zoo/eval/coco.py does not call model.coco_predictions yet (torchvision detection outputs)")
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (w, h) in enumerate([(80, 64), (72, 60)], start=1):
        Image.new("RGB", (w, h), (image_id * 40, 90, 160)).save(tmp_path / "val2017" / f"{image_id:012d}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [10, 10, 30, 30],
                            "area": 900, "iscrowd": 0})
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "hand-raising"}]}))

    name = "handraise_rcnn_r50_fpn_rpa_distance"
    config = zoo.model_info(name)
    small = dataclasses.replace(config, preprocessing={**config.preprocessing, "resize_shorter": 64, "max_size": 96})
    protocol = protocol_cls(tmp_path, small, {k: v for k, v in config.eval.items() if k != "protocol"})
    model = zoo.create_model(name, **SMALL).eval()
    model.roi_heads.score_thresh = 0.0
    items = [protocol.dataset()[i] for i in range(len(protocol.dataset()))]
    predictions = protocol.predict(model, protocol.collate(items), torch.device("cpu"))
    assert len(predictions) == 2
    metrics = protocol.compute(predictions)
    assert "AP" in metrics and 0.0 <= metrics["AP"] <= 100.0
