"""DETR + iRPE: the original's checkpoint converts and reproduces the fixture; R50 layout equals the original's."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import zoo
from conftest import fixture_dir, load_case
from zoo.errors import ConversionError
from zoo.models.detr import DETR, PostProcess, build_detr, kwargs_from_checkpoint, nested_tensor_from_tensor_list

FAMILY = "irpe"
CASE = "detr_tiny_rpe-2.0-product-ctx-1-k"
TINY = dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32, num_queries=5,
            backbone_width_div=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture's original training container converted with `python -m zoo convert --from irpe-detr`."""
    from zoo.cli import main

    src = fixture_dir(FAMILY) / f"{CASE}.pth"
    out = tmp_path_factory.mktemp("irpe_detr") / "converted"
    assert main(["convert", "--from", "irpe-detr", str(src), "--out", str(out)]) == 0
    return out


def test_converted_config_records_architecture(converted):
    meta, _ = load_case(FAMILY, CASE)
    config = json.loads((converted / "config.json").read_text())
    assert config["model"] == "detr_r50_irpe" and config["converter"] == "irpe-detr"
    kw = config["kwargs"]
    for name in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "pre_norm",
                 "enc_rpe2d", "aux_loss"):
        assert kw[name] == meta["args"][name], name
    assert kw["num_classes"] == 91 and kw["backbone_width_div"] == 16


def test_detr_fixture_parity(converted):
    meta, t = load_case(FAMILY, CASE)
    a = meta["args"]
    # built through the public constructor with the original main.py argument names
    model = zoo.create_model("detr_r50_irpe", weights=str(converted), hidden_dim=a["hidden_dim"], nheads=a["nheads"],
                             enc_layers=a["enc_layers"], dec_layers=a["dec_layers"],
                             dim_feedforward=a["dim_feedforward"], num_queries=a["num_queries"],
                             pre_norm=a["pre_norm"], enc_rpe2d=a["enc_rpe2d"], num_classes=91,
                             aux_loss=a["aux_loss"], backbone_width_div=16)
    assert isinstance(model, DETR) and not model.training
    tol = meta["tolerance"]
    with torch.no_grad():
        out = model([t["image.0"], t["image.1"]], return_intermediates=True)
    inter = out["intermediates"]

    def close(actual, key, tol_key=None):
        tl = tol[tol_key or key]
        torch.testing.assert_close(actual, t[key], atol=tl["atol"], rtol=tl["rtol"], msg=lambda m: f"{key}: {m}")

    _, image_mask = nested_tensor_from_tensor_list([t["image.0"], t["image.1"]])
    assert torch.equal(image_mask, t["image_mask"].bool())
    assert torch.equal(inter["feature_mask"], t["feature_mask"].bool())
    close(inter["backbone_features"], "backbone_features")
    close(inter["pos_embed"], "pos_embed")
    close(inter["encoder_memory"], "encoder_memory")
    close(out["pred_logits"], "pred_logits")
    close(out["pred_boxes"], "pred_boxes")
    assert len(out["aux_outputs"]) == a["dec_layers"] - 1
    close(out["aux_outputs"][0]["pred_logits"], "aux_outputs.0.pred_logits", "pred_logits")
    close(out["aux_outputs"][0]["pred_boxes"], "aux_outputs.0.pred_boxes", "pred_boxes")
    torch.testing.assert_close(inter["decoder_hs"], t["decoder_hs"], atol=1e-4, rtol=1e-4)

    post = PostProcess()(out, t["target_sizes"])
    for i, det in enumerate(post):
        torch.testing.assert_close(det["scores"], t[f"post.{i}.scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(det["boxes"], t[f"post.{i}.boxes"], atol=tol["post.*.boxes"]["atol"],
                                   rtol=tol["post.*.boxes"]["rtol"])
        assert torch.equal(det["labels"], t[f"post.{i}.labels"])

    # a padded batch with its mask gives the same as the list of images
    batch, mask = nested_tensor_from_tensor_list([t["image.0"], t["image.1"]])
    with torch.no_grad():
        out2 = model(batch, mask)
    torch.testing.assert_close(out2["pred_logits"], out["pred_logits"], atol=0, rtol=0)


@pytest.mark.parametrize("spec", ["rpe-1.9-product-ctx-1-k", "rpe-2.0-product-ctx-1-k"])
def test_r50_state_dict_layout_equals_original(spec):
    info = json.loads((fixture_dir(FAMILY) / "detr_r50_irpe_keys.json").read_text())["configs"][spec]
    name = {"rpe-1.9-product-ctx-1-k": "detr_r50_irpe_product_ctx_7x7",
            "rpe-2.0-product-ctx-1-k": "detr_r50_irpe_product_ctx_9x9"}[spec]
    with torch.device("meta"):  # no memory, no init cost
        model = zoo.create_model(name)
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert len(ours) == info["num_keys"] == 464
    assert ours == info["keys"]  # same keys, shapes, dtypes, and even the same order
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == info["num_parameters_trainable"]
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters_all"]
    assert sum(b.numel() for b in model.buffers()) == info["num_buffers_elements"]


def test_registry_entries():
    names = zoo.list_models("detr_r50_irpe*")
    assert names == ["detr_r50_irpe", "detr_r50_irpe_product_ctx_7x7", "detr_r50_irpe_product_ctx_9x9"]
    cfg9 = zoo.model_info("detr_r50_irpe_product_ctx_9x9")
    assert set(cfg9.weights) == {"coco_150ep", "coco_300ep"}
    for entry in list(cfg9.weights.values()) + list(zoo.model_info("detr_r50_irpe_product_ctx_7x7").weights.values()):
        assert entry.source.startswith("https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/")
        assert entry.converter == "irpe-detr" and entry.sha256 is None and "sha256" in entry.note
    ap = {(r.weights, r.metric): r.value for r in cfg9.reported}
    assert ap[("coco_300ep", "AP")] == 42.2 and ap[("coco_150ep", "AP")] == 41.0
    assert {m for _, m in ap} == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    cfg7 = zoo.model_info("detr_r50_irpe_product_ctx_7x7")
    assert {r.metric: r.value for r in cfg7.reported}["AP"] == 40.9
    assert cfg9.eval["protocol"] == "coco"


def test_rpe_alias_and_spec_errors():
    m = zoo.create_model("detr_r50_irpe", rpe="rpe-1.9-product-bias-0-qk", **TINY)
    layer = m.transformer.encoder.layers[0].self_attn
    assert layer.rpe_q.lookup_table_bias.shape == (2, 49) and layer.rpe_v is None
    with pytest.raises(ValueError, match="disagree"):
        zoo.create_model("detr_r50_irpe", rpe="rpe-1.9-product-ctx-1-k", enc_rpe2d="rpe-2.0-product-ctx-1-k", **TINY)
    with pytest.raises(ValueError, match="malformed iRPE spec"):
        zoo.create_model("detr_r50_irpe", enc_rpe2d="rpe-2.0-product", **TINY)
    plain = zoo.create_model("detr_r50_irpe", enc_rpe2d="", **TINY)
    assert not any("rpe_" in k for k in plain.state_dict())


@pytest.mark.parametrize("spec", ["rpe-1.9-cross-ctx-0-qkv", "rpe-2.5-quant-bias-1-qk", "rpe-1.9-euc-ctx-1-kv"])
def test_all_methods_run_in_detr(spec):
    """Including cross, which crashed the original's RPEMultiheadAttention."""
    torch.manual_seed(0)
    model = zoo.create_model("detr_r50_irpe", enc_rpe2d=spec, **TINY).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 5, 92) and out["pred_boxes"].shape == (2, 5, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    # gradients reach the tables in training mode
    model.train()
    model(images)["pred_logits"].sum().backward()
    tables = [p for n, p in model.named_parameters() if "lookup_table" in n]
    assert tables and all(p.grad is not None for p in tables)


def test_lookup_tables_start_nonzero_like_original():
    """Transformer._reset_parameters xavier-initialises the tables too (spec §5 quirk)."""
    m = zoo.create_model("detr_r50_irpe", **TINY)
    assert m.transformer.encoder.layers[0].self_attn.rpe_k.lookup_table_weight.abs().sum() > 0


def test_input_errors_and_postprocess():
    m = zoo.create_model("detr_r50_irpe", **TINY).eval()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        m([torch.randn(1, 64, 64)])
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(out, torch.tensor([[64, 64]]))
    dets = PostProcess()(out, torch.tensor([[480, 640], [64, 64]]))
    assert dets[0]["boxes"].shape == (5, 4) and dets[0]["labels"].max() < 91
    assert (dets[0]["boxes"][:, 2] <= 640 + 1e-3).all()


def test_kwargs_from_checkpoint_variants():
    assert kwargs_from_checkpoint({"model": {}}) == {}  # stripped release file
    ns = argparse.Namespace(backbone="resnet101", enc_rpe2d="", hidden_dim=256, dataset_file="coco", masks=False)
    kw = kwargs_from_checkpoint({"model": {}, "args": ns})
    assert kw["backbone_layers"] == [3, 4, 23, 3] and kw["enc_rpe2d"] == "" and kw["num_classes"] == 91
    with pytest.raises(ConversionError, match="resnet18"):
        kwargs_from_checkpoint({"model": {}, "args": argparse.Namespace(backbone="resnet18")})
    with pytest.raises(ConversionError, match="masks"):
        kwargs_from_checkpoint({"model": {}, "args": argparse.Namespace(backbone="resnet50", masks=True)})


def test_build_errors():
    with pytest.raises(ValueError, match="divisible"):
        build_detr(hidden_dim=30, nheads=8)
    with pytest.raises(ValueError, match="position_embedding"):
        build_detr(position_embedding="learned", **TINY)


def test_single_image_tensor_and_bad_rank():
    m = zoo.create_model("detr_r50_irpe", **TINY).eval()
    img = torch.randn(3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(m(img)["pred_boxes"], m([img])["pred_boxes"])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        m(torch.randn(1, 1, 3, 64, 64))


def test_backbone_for_training_from_scratch():
    """frozen_bn=False + trainable_backbone_layers=5: ordinary BatchNorm, every backbone parameter trains
    (the default stays the original's: FrozenBatchNorm2d, stem and layer1 frozen)."""
    from zoo.models.resnet import FrozenBatchNorm2d

    small = dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=3,
                 backbone_width_div=16, backbone_layers=[1, 1, 1, 1], enc_rpe2d="rpe-2.0-product-ctx-1-k")
    body = build_detr(frozen_bn=False, trainable_backbone_layers=5, **small).backbone[0].body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in body.parameters())
    original = build_detr(**small).backbone[0].body
    assert isinstance(original.bn1, FrozenBatchNorm2d)
    assert {n.split(".")[0] for n, p in original.named_parameters() if p.requires_grad} == {"layer2", "layer3", "layer4"}
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        build_detr(trainable_backbone_layers=7, **small)


def test_what_follows_the_backbone_does_not_depend_on_padding():
    """The feature mask, the sine positions (normalised by each image's own valid size), the iRPE buckets of the
    padded grid and key_padding_mask in encoder and decoder make a valid token's outputs independent of how much
    padding its batch adds (spec irpe §5): the same features alone or padded into a bigger batch give the same
    memory at valid positions and the same decoder outputs. Padding enters DETR only through the backbone's
    border (the CNN sees the padded pixels), as in the original."""
    from zoo.models.detr import PositionEmbeddingSine, Transformer

    torch.manual_seed(0)
    transformer = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                              dropout=0.0, return_intermediate_dec=True, enc_rpe2d="rpe-2.0-product-ctx-1-k").eval()
    position = PositionEmbeddingSine(16, normalize=True)
    queries = torch.randn(6, 32)
    small, big = torch.randn(1, 32, 5, 7), torch.randn(1, 32, 9, 6)
    with torch.no_grad():
        alone_hs, alone_memory = transformer(small, torch.zeros(1, 5, 7, dtype=torch.bool), queries,
                                             position(torch.zeros(1, 5, 7, dtype=torch.bool)))
        batch, mask = torch.zeros(2, 32, 9, 7), torch.ones(2, 9, 7, dtype=torch.bool)
        batch[0, :, :5, :7], mask[0, :5, :7] = small[0], False
        batch[1, :, :9, :6], mask[1, :9, :6] = big[0], False
        hs, memory = transformer(batch, mask, queries, position(mask))
    torch.testing.assert_close(hs[:, :1], alone_hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory[:1, :, :5, :7], alone_memory, atol=1e-5, rtol=1e-5)
