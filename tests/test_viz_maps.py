"""zoo.viz.attention_maps shows what each layer computes: every map is checked against the layer's own
output (rebuilt from the map), against the public op that defines it, or against what it must be
(bucket maps hold num_buckets ids, attention sums to one); and every figure of them is a non-blank PNG.

Small layers and models only, one torch thread.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("matplotlib")

from conftest import picture  # noqa: E402
from zoo.layers.irpe import METHOD, get_bucket_ids_2d, iRPE, iRPE_Cross, get_single_rpe_config  # noqa: E402
from zoo.layers.rga import RGA_Module  # noqa: E402
from zoo.layers.rpa import (MultiheadNonlocal2d, relative_attend_query_reference,  # noqa: E402
                            relative_attend_weight_reference)
from zoo.layers.rsa import RSA  # noqa: E402
from zoo.layers.sasa import AttentionConv, SASAttention2d  # noqa: E402
from zoo.models.detr import detr_r50_irpe  # noqa: E402
from zoo.viz import plots  # noqa: E402
from zoo.viz.figure import figure_png  # noqa: E402
from zoo.viz.maps import (CrossMaps, IRPEMaps, RGAMaps, RPAMaps, RSAMaps, SASAMaps, attention_maps,  # noqa: E402
                          bucket_map, grid_cell)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_non_blank(fig):
    picture(figure_png(fig))


def _rpe(method, ratio=2.0, mode="bias"):
    cfg = get_single_rpe_config(ratio=ratio, method=method, mode=mode, shared_head=False)
    cls = iRPE_Cross if method == METHOD.CROSS else iRPE
    return cls(head_dim=8, num_heads=2, mode=mode, method=method, transposed=True, num_buckets=cfg.num_buckets,
               rpe_config=cfg)


# =============================================================================================
# iRPE

def test_bucket_map_has_num_buckets_distinct_values():
    # product, ratio 2: beta 4, 9 x 9 buckets; offsets reach the last bucket from |10| on
    rpe = _rpe(METHOD.PRODUCT)
    ids = bucket_map(rpe, 21, 21, (10, 10))
    assert ids.shape == (21, 21)
    assert ids.unique().numel() == rpe.num_buckets == 81
    assert ids[10, 10] == 40  # the zero offset is the centre bucket (4 * 9 + 4)
    # the same row of the full (L, L) map, and the q table reads the pair the other way round
    full, _ = get_bucket_ids_2d(METHOD.PRODUCT, 21, 21, 0, 2.0, 4.0, 16.0)
    assert torch.equal(ids.flatten(), full[10 * 21 + 10])
    assert torch.equal(bucket_map(rpe, 21, 21, (3, 5), reverse=True).flatten(), full[:, 3 * 21 + 5])
    # cross: each half has 2 beta + 1 buckets, all of them on a large enough map
    cross = _rpe(METHOD.CROSS)
    for half in (cross.rp_rows, cross.rp_cols):
        assert bucket_map(half, 21, 21, (10, 10)).unique().numel() == half.num_buckets == 9
    # euc: distances are >= 0, so only beta + 1 of the 2 beta + 1 buckets are ever used (as in the original)
    euc = _rpe(METHOD.EUCLIDEAN)
    assert bucket_map(euc, 41, 41, (20, 20)).unique().numel() == int(euc.rpe_config["beta"]) + 1


def _small_detr():
    torch.manual_seed(0)
    return detr_r50_irpe(num_classes=4, hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=64,
                         num_queries=6, backbone_width_div=16, dropout=0.0).eval()


def test_detr_maps_buckets_tables_and_cross_attention():
    model = _small_detr()
    x = torch.randn(3, 96, 128)
    maps = attention_maps(model, x, point=(0.0, 1.0))
    irpe = maps.of(IRPEMaps)
    assert list(irpe) == ["transformer.encoder.layers.0.self_attn", "transformer.encoder.layers.1.self_attn"]
    first = irpe["transformer.encoder.layers.0.self_attn"]
    assert first.feature_size == (3, 4) and first.skip == 0 and first.query == (0, 3)  # the top-right cell
    rpe = model.transformer.encoder.layers[0].self_attn.rpe_k
    assert torch.equal(first.bucket_maps["k"], bucket_map(rpe, 3, 4, (0, 3)))
    # contextual table: the norm of each bucket's vector, on the 9 x 9 product grid
    expected = rpe.lookup_table_weight.detach().norm(dim=1)[:, :81].reshape(1, 9, 9)
    assert torch.allclose(first.tables["k"], expected)
    cross = maps.of(CrossMaps)
    assert len(cross) == 2  # one per decoder layer
    last = list(cross.values())[-1]
    assert last.attention.shape == (6, 3, 4)
    assert torch.allclose(last.attention.flatten(1).sum(-1), torch.ones(6), atol=1e-5)
    det = maps.detections
    assert det.boxes.shape == (6, 4) and det.scores.shape == (6,)
    assert (det.boxes[:, 0] >= -1e-4).all() and (det.boxes[:, 2] <= 128 + 1e-3).all()
    # the model was put back in the mode it had
    model.train()
    attention_maps(model, x)
    assert model.training
    image = np.random.rand(96, 128, 3)
    for fig in (plots.plot_bucket_map(first), plots.plot_rpe_tables(irpe),
                plots.plot_cross_attention(image, last, det)):
        assert_non_blank(fig)


# =============================================================================================
# RGA: the module's output is its input times the maps

@pytest.mark.parametrize("spatial, channel", [(True, True), (True, False), (False, True)])
def test_rga_maps_rebuild_the_module_output(spatial, channel):
    torch.manual_seed(0)
    module = RGA_Module(16, 6 * 4, use_spatial=spatial, use_channel=channel, cha_ratio=2, spa_ratio=2,
                        down_ratio=2).eval()
    model = nn.Sequential(nn.Conv2d(3, 16, 1), module)
    x = torch.randn(3, 6, 4)
    maps = attention_maps(model, x).layers["1"]
    assert isinstance(maps, RGAMaps)
    with torch.no_grad():
        features = model[0](x[None])
        out = module(features)
    rebuilt = features
    if spatial:
        assert maps.spatial.shape == (6, 4) and ((maps.spatial > 0) & (maps.spatial < 1)).all()
        rebuilt = rebuilt * maps.spatial
    else:
        assert maps.spatial is None
    if channel:
        assert maps.channel.shape == (16,)
        rebuilt = rebuilt * maps.channel.view(1, 16, 1, 1)
    else:
        assert maps.channel is None
    assert torch.allclose(rebuilt, out, atol=1e-5)
    if spatial:
        assert_non_blank(plots.plot_spatial_attention(np.random.rand(24, 16, 3), {"m": maps}))
    if channel:
        assert_non_blank(plots.plot_channel_attention({"m": maps}))


# =============================================================================================
# RSA: with feat_type 'V', the layer's output at the position is the kernel applied to the values

def _norm(z, dim):
    return z / torch.sqrt(z.pow(2).sum(dim, keepdim=True) + 1e-6)


@pytest.mark.parametrize("kernel_type", ["V", "R", "VplusR"])
def test_rsa_kernel_rebuilds_the_layer_output(kernel_type):
    torch.manual_seed(0)
    layer = RSA(8, 8, nh=2, dk=4, dv=4, dd=4, kernel_size=(3, 3, 3), kernel_type=kernel_type, feat_type="V").eval()
    model = nn.Sequential(layer)
    x = torch.randn(8, 4, 5, 6)
    maps = attention_maps(model, x, point=(0.9, 0.2), frame=3).layers["0"]
    assert isinstance(maps, RSAMaps)
    t, y, w = maps.position
    assert (t, y, w) == (3, 4, 1) and maps.kernel.shape == (2, 3, 3, 3)
    with torch.no_grad():
        out = layer(x[None])[0]  # (nh * dv, T, H, W), channel u * nh + h
        v = _norm(layer.projection(x[None])[:, -4:], 1)[0]  # (dv, T, H, W)
    padded = F.pad(v, (1, 1, 1, 1, 1, 1))
    window = padded[:, t:t + 3, y:y + 3, w:w + 3]  # (dv, 3, 3, 3) around the position
    rebuilt = torch.einsum("habc,uabc->uh", maps.kernel, window).flatten()
    assert torch.allclose(rebuilt, out[:, t, y, w], atol=1e-5)
    frames = [np.random.rand(20, 24, 3) for _ in range(4)]
    assert_non_blank(plots.plot_relational_kernels(frames, maps))


# =============================================================================================
# RPA: the attention rows are the block's (its output rebuilt from the full attention)

@pytest.mark.parametrize("mode, kernel, size", [("relative_position", 1, (5, 7)), ("relative_distance", 3, (7, 6))])
def test_rpa_maps_are_the_blocks_attention(mode, kernel, size):
    torch.manual_seed(0)
    layer = MultiheadNonlocal2d(4, hidden_channels=3, num_heads=2, kernel_size=kernel, rpa_mode=mode,
                                rpa_kernel_size=3, rpa_zero_init=False).eval()
    model = nn.Sequential(layer)
    x = torch.randn(4, *size)
    maps = attention_maps(model, x, point=(0.3, 0.7)).layers["0"]
    assert isinstance(maps, RPAMaps)
    with torch.no_grad():
        out, heads = layer(x[None]), []
        for t, conv in enumerate(layer.embed_conv):  # the block's definition (spec rpa 1.3), every query
            q, k, v = conv(x[None]).flatten(2).split(3, dim=1)
            hidden = conv(x[None]).shape[-2:]
            logits = q.transpose(1, 2) @ k + relative_attend_query_reference(q, layer.reference_affinity("k", t, hidden), hidden)
            attn = torch.softmax(layer.scale * logits, dim=-1)
            y_head = v @ attn.transpose(1, 2) + relative_attend_weight_reference(attn, layer.reference_affinity("v", t, hidden), hidden)
            heads.append((attn, y_head, torch.softmax(layer.scale * (q.transpose(1, 2) @ k), dim=-1)))
        y = torch.cat([h[1] for h in heads], 1).reshape(1, -1, *hidden)
        assert torch.allclose(layer.output_conv(y, output_size=list(size)) + x[None], out, atol=1e-5)  # the reference is right
    assert maps.feature_size == tuple(hidden)
    qy, qx = maps.query
    i = qy * hidden[1] + qx
    for t, (attn, _, without) in enumerate(heads):
        assert torch.allclose(maps.attention[t].flatten(), attn[0, i], atol=1e-6)
        assert torch.allclose(maps.attention_without[t].flatten(), without[0, i], atol=1e-6)
    assert torch.allclose(maps.attention.flatten(1).sum(-1), torch.ones(2), atol=1e-5)
    # the hidden grid of a 3x3 embedding without padding is one cell in from the input's
    assert maps.placement.origin == ((1.0, 1.0) if kernel == 3 else (0.0, 0.0))
    assert_non_blank(plots.plot_affinity(np.random.rand(size[0] * 4, size[1] * 4, 3), maps))


# =============================================================================================
# SASA: the window's weights rebuild the layer's output at the pixel

def _window_values(v, i, j, k, offset):
    """(C, k, k) values of the window whose corner is offset (zeros outside)."""
    out = v.new_zeros(v.shape[0], k, k)
    for a in range(k):
        for b in range(k):
            y, x = offset[0] + a, offset[1] + b
            if 0 <= y < v.shape[1] and 0 <= x < v.shape[2]:
                out[:, a, b] = v[:, y, x]
    return out


@pytest.mark.parametrize("kind, padding_mode, point", [("sasa", "mask", (0.0, 0.0)), ("sasa", "zeros", (0.0, 0.99)),
                                                         ("sasa", "mask", (0.5, 0.5)), ("leader", None, (0.4, 0.6))])
def test_sasa_window_weights_rebuild_the_layer_output(kind, padding_mode, point):
    torch.manual_seed(0)
    k, heads = 3, 2
    if kind == "sasa":
        layer = SASAttention2d(4, 8, kernel_size=k, heads=heads, padding_mode=padding_mode).eval()
    else:
        layer = AttentionConv(4, 8, kernel_size=k, padding=1, groups=heads).eval()
    model = nn.Sequential(layer)
    x = torch.randn(4, 6, 5)
    maps = attention_maps(model, x, point=point).layers["0"]
    assert isinstance(maps, SASAMaps)
    i, j = maps.pixel
    assert (i, j) == grid_cell(point, (6, 5))
    with torch.no_grad():
        out = layer(x[None])[0]
        if kind == "sasa":
            v, offset = layer.value(x[None])[0], (i - 1, j - 1)
        else:  # x padded before the value conv: in padded coordinates the window starts at the pixel
            v, offset = layer.value_conv(F.pad(x[None], (1, 1, 1, 1)))[0], (i, j)
    assert torch.allclose(maps.attention.flatten(1).sum(-1), torch.ones(heads), atol=1e-5)
    window = _window_values(v, i, j, k, offset).view(heads, 4, k, k)  # (heads, d, k, k)
    rebuilt = torch.einsum("hab,hdab->hd", maps.attention, window).flatten()
    assert torch.allclose(rebuilt, out[:, i, j], atol=1e-5)
    if padding_mode == "mask" and point == (0.0, 0.0):  # the corner: the window's first row and column are outside
        assert (maps.attention[:, 0, :] == 0).all() and (maps.attention[:, :, 0] == 0).all()
        assert torch.isnan(maps.relative[:, 0, 0]).all() and not torch.isnan(maps.relative[:, 1:, 1:]).any()
    # the relative term is what separates the two softmaxes
    logits_without = torch.log(maps.attention_without.clamp_min(1e-30))
    if padding_mode != "mask":
        expected = torch.softmax((logits_without + maps.relative).flatten(1), -1).view_as(maps.attention)
        assert torch.allclose(expected, maps.attention, atol=1e-5)
    assert_non_blank(plots.plot_local_attention(np.random.rand(24, 20, 3), maps))


# =============================================================================================
# Errors

def test_attention_maps_refuses_what_it_cannot_show():
    with pytest.raises(ValueError, match="no attention layer that zoo.viz knows"):
        attention_maps(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(3, 8, 8))
    model = nn.Sequential(SASAttention2d(4, 8, kernel_size=3, heads=2))
    with pytest.raises(ValueError, match="point must be"):
        attention_maps(model, torch.randn(4, 6, 6), point=(1.5, 0.0))
    with pytest.raises(ValueError, match="without a batch dimension"):
        attention_maps(model, torch.randn(4, 6))
    assert math.isclose(float(grid_cell((1.0, 1.0), (4, 5))[1]), 4)
