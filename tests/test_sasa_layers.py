"""SASA layers: parity with the originals' fixtures (bug-compatible), the corrected defaults, the paper layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_case

from zoo import ops
from zoo.layers.sasa import AttentionConv, AttentionStem, RelativeSelfAttention, SASAttention2d, SASAttentionStem

LAYERS = {"seed_rsa": RelativeSelfAttention, "leader_attconv": AttentionConv, "leader_attstem": AttentionStem}
CASES = ["seed_rsa_k3_g4_s1", "seed_rsa_k7_g8_s1", "seed_rsa_k3_g4_s2", "leader_attconv_k3_g4", "leader_attconv_k7_g8",
         "leader_attstem_k4_m4"]
BACKENDS = ["native", "reference"]


def _backend_or_skip(backend):
    if backend == "native" and ops.mode() == "reference":
        pytest.skip("RELZOO_OPS=reference: native op disabled")
    return backend


def _layer_for(case: str, meta: dict, **extra) -> torch.nn.Module:
    cls = next(c for prefix, c in LAYERS.items() if case.startswith(prefix))
    return cls(**meta["ctor"], **extra)


def _run_case(case, backend, dtype):
    meta, t = load_case("sasa", case)
    layer = _layer_for(case, meta, bug_compatible=True).to(dtype)
    layer.load_state_dict({k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}, strict=True)
    x = t["input"].to(dtype).requires_grad_(True)
    out = layer(x, backend=backend)
    (out * t["grad_output"].to(dtype)).sum().backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in layer.named_parameters()}
    return meta, t, out, x.grad, grads


def _assert_case(meta, t, out, grad_input, grads, tol):
    torch.testing.assert_close(out.double(), t["output"], **tol["output"])
    torch.testing.assert_close(grad_input.double(), t["grad_input"], **tol["grad_input"])
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), t[f"grad_{name}"], **tol["grad_params"], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_fixture_parity_float64(case, backend):
    meta, t, out, gin, grads = _run_case(case, _backend_or_skip(backend), torch.float64)
    _assert_case(meta, t, out, gin, grads, meta["tolerance"]["float64"])


@pytest.mark.parametrize("case", ["seed_rsa_k7_g8_s1", "leader_attconv_k7_g8", "leader_attstem_k4_m4"])
def test_fixture_parity_float32_native(case):
    meta, t, out, gin, grads = _run_case(case, _backend_or_skip("native"), torch.float32)
    _assert_case(meta, t, out, gin, grads, meta["tolerance"]["float32_impl_vs_float64_fixture"])


def test_notebook_bug_leaves_row_embeddings_unused():
    meta, t, *_ = _run_case("seed_rsa_k3_g4_s1", "reference", torch.float64)
    assert torch.count_nonzero(t["grad_row_embeddings"]) == 0  # the fixture's own statement of the bug


def _random_input(c, h=7, w=8, b=2, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_relative_self_attention_default_uses_every_group_slice():
    torch.manual_seed(0)
    fixed = RelativeSelfAttention(8, 16, 3, groups=4).double()
    buggy = RelativeSelfAttention(8, 16, 3, groups=4, bug_compatible=True).double()
    buggy.load_state_dict(fixed.state_dict())
    x = _random_input(8)
    assert not torch.allclose(fixed(x), buggy(x))
    fixed(x).sum().backward()
    assert torch.count_nonzero(fixed.row_embeddings.grad) > 0  # row offsets reach the output again
    one_group = RelativeSelfAttention(8, 16, 3, groups=1).double()
    one_group_bug = RelativeSelfAttention(8, 16, 3, groups=1, bug_compatible=True).double()
    one_group_bug.load_state_dict(one_group.state_dict())
    torch.testing.assert_close(one_group(x), one_group_bug(x))  # G = 1: no bug to fix


def test_attention_conv_default_is_per_head_softmax():
    torch.manual_seed(0)
    heads4 = AttentionConv(8, 16, 3, padding=1, groups=4).double()
    per_channel = AttentionConv(8, 16, 3, padding=1, groups=4, bug_compatible=True).double()
    per_channel.load_state_dict(heads4.state_dict())
    x = _random_input(8)
    assert not torch.allclose(heads4(x), per_channel(x))
    # groups = channels (heads of width 1) is exactly the original's per-channel softmax
    width1 = AttentionConv(8, 16, 3, padding=1, groups=16).double()
    width1.load_state_dict(heads4.state_dict())
    torch.testing.assert_close(width1(x), per_channel(x))
    # and in the original groups has no effect at all
    per_channel_g1 = AttentionConv(8, 16, 3, padding=1, groups=1, bug_compatible=True).double()
    per_channel_g1.load_state_dict(heads4.state_dict())
    torch.testing.assert_close(per_channel_g1(x), per_channel(x))


def test_attention_stem_default_is_per_head_softmax():
    torch.manual_seed(0)
    fixed = AttentionStem(3, 8, 4, padding=2, groups=8).double()
    buggy = AttentionStem(3, 8, 4, padding=2, groups=8, bug_compatible=True).double()
    buggy.load_state_dict(fixed.state_dict())
    x = _random_input(3)
    torch.testing.assert_close(fixed(x), buggy(x))  # heads of width 1 == per-channel softmax
    two_heads = AttentionStem(3, 8, 4, padding=2, groups=2, m=4).double()
    assert two_heads(x).shape == (2, 8, 7, 8)


@pytest.mark.parametrize("make", [
    lambda s: RelativeSelfAttention(8, 16, 3, groups=4, stride=s),
    lambda s: AttentionConv(8, 16, 3, stride=s, padding=1, groups=4),
    lambda s: AttentionStem(8, 16, 4, stride=s, padding=2, groups=2),
], ids=["notebook", "attention_conv", "attention_stem"])
def test_stride_takes_every_sth_query(make):
    torch.manual_seed(0)
    strided = make(2).double()
    dense = make(1).double()
    dense.load_state_dict(strided.state_dict())
    x = _random_input(8, 9, 11)
    out = strided(x)
    assert out.shape[-2:] == (5, 6)  # ceil(9/2), ceil(11/2)
    torch.testing.assert_close(out, dense(x)[:, :, ::2, ::2])


def test_leader_layers_refuse_what_the_original_cannot_run():
    with pytest.raises(ValueError, match="stride=2 is not supported by the original"):
        AttentionConv(8, 16, 3, stride=2, padding=1, bug_compatible=True)(_random_input(8).float())
    with pytest.raises(ValueError, match="padding=0 is too small for kernel_size=7"):
        AttentionConv(8, 16, 7)(_random_input(8).float())
    with pytest.raises(ValueError, match=r"expects input \(B, 8, H, W\)"):
        AttentionConv(8, 16, 3, padding=1)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="divisible by groups"):
        AttentionConv(8, 18, 3, padding=1, groups=4)


def test_leader_key_bias_gets_no_gradient():
    # spec §4.6: padding before the conv makes padded keys equal the bias, which then shifts every
    # logit of a channel equally: key_conv.bias has zero gradient analytically
    torch.manual_seed(0)
    layer = AttentionConv(4, 8, 3, padding=1, groups=2, bias=True, bug_compatible=True).double()
    layer(_random_input(4)).pow(2).sum().backward()
    assert layer.key_conv.bias.grad.abs().max() < 1e-12
    assert layer.value_conv.bias.grad.abs().max() > 1e-3


# -------------------------------------------------------------------------------- paper layer

def _sasa_brute_force(layer: SASAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Spec §1 read literally, one pixel at a time: per head, logits q.(k + [r_row; r_col]) over the
    in-image pixels of the k x k window, softmax, weighted sum of the values (stride 1)."""
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    b, c, h, w = q.shape
    n, d, ks = layer.heads, c // layer.heads, layer.kernel_size
    p = (ks - 1) // 2
    out = torch.zeros_like(q)
    for head in range(n):
        ch = slice(head * d, (head + 1) * d)
        rows = layer.rel_row[head * d // 2:(head + 1) * d // 2]  # (d/2, ks)
        cols = layer.rel_col[head * d // 2:(head + 1) * d // 2]
        for i in range(h):
            for j in range(w):
                logits, values = [], []
                for a in range(ks):
                    for bb in range(ks):
                        y, xx = i - p + a, j - p + bb
                        if 0 <= y < h and 0 <= xx < w:
                            r = torch.cat([rows[:, a], cols[:, bb]])
                            logits.append((q[:, ch, i, j] * (k[:, ch, y, xx] + r)).sum(1))
                            values.append(v[:, ch, y, xx])
                weights = torch.softmax(torch.stack(logits, 1), 1)
                out[:, ch, i, j] = (weights[:, :, None] * torch.stack(values, 1)).sum(1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_sasa_layer_matches_the_paper_formula(backend):
    torch.manual_seed(0)
    layer = SASAttention2d(6, 8, kernel_size=5, heads=2).double()
    x = _random_input(6, 5, 6, b=1)
    torch.testing.assert_close(layer(x, backend=_backend_or_skip(backend)), _sasa_brute_force(layer, x))


def test_sasa_padding_modes_differ_only_near_borders():
    torch.manual_seed(0)
    masked = SASAttention2d(8, 16, kernel_size=3, heads=4).double()
    zeros = SASAttention2d(8, 16, kernel_size=3, heads=4, padding_mode="zeros").double()
    zeros.load_state_dict(masked.state_dict())
    x = _random_input(8, 7, 8)
    a, b = masked(x), zeros(x)
    torch.testing.assert_close(a[:, :, 1:-1, 1:-1], b[:, :, 1:-1, 1:-1])
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3


def test_sasa_stride_is_average_pool_after_attention():
    torch.manual_seed(0)
    strided = SASAttention2d(8, 16, kernel_size=3, stride=2, heads=4).double()
    dense = SASAttention2d(8, 16, kernel_size=3, stride=1, heads=4).double()
    dense.load_state_dict(strided.state_dict())
    x = _random_input(8, 8, 10)
    torch.testing.assert_close(strided(x), F.avg_pool2d(dense(x), 2))
    assert strided(_random_input(8, 7, 9)).shape[-2:] == (4, 5)  # ceil, like the strided 1x1 shortcut


def test_sasa_parameter_count_and_errors():
    layer = SASAttention2d(64, 128, kernel_size=7, heads=8)
    assert sum(p.numel() for p in layer.parameters()) == 3 * 64 * 128 + 128 * 7
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SASAttention2d(8, 16, padding_mode="reflect")
    with pytest.raises(ValueError, match="heads=8 of even width"):
        SASAttention2d(8, 24, heads=8)
    with pytest.raises(ValueError, match=r"expects input \(B, 8, H, W\)"):
        SASAttention2d(8, 16, heads=4)(torch.randn(1, 3, 5, 5))


def test_attention_stem_is_local_to_its_tiles():
    torch.manual_seed(0)
    stem = SASAttentionStem(3, 16, block=4, heads=4, mixtures=3).double()
    x = _random_input(3, 8, 12, b=1)
    out = stem(x)
    assert out.shape == (1, 16, 8, 12)
    x2 = x.clone()
    x2[:, :, 5, 9] += 1.0  # tile (1, 2)
    changed = (stem(x2) - out).abs().amax(1)[0] > 0
    assert changed[4:8, 8:12].all() and changed.sum() == 16
    torch.testing.assert_close(stem.mixture().sum(0), torch.ones(4, 4, dtype=torch.float64))


def test_attention_stem_masks_padding_of_partial_tiles():
    torch.manual_seed(0)
    stem = SASAttentionStem(3, 8, block=4, heads=2, mixtures=2).double()
    x = _random_input(3, 6, 7, b=1)
    out = stem(x)
    assert out.shape == (1, 8, 6, 7)
    # query pixel (5, 6) lies in the partial tile rows 4-5 x cols 4-6: only those 6 pixels are keys
    q, k = stem.query(x)[0, :4, 5, 6], stem.key(x)[0, :4, 4:6, 4:7].reshape(4, -1)  # head 0
    mix = stem.mixture()  # (m, 4, 4); positions in the tile: rows 0-1, cols 0-2
    values = stem.value(x)[0].view(2, 8, 6, 7)[:, :4, 4:6, 4:7]  # (m, 4 channels, 2, 3)
    v = (values * mix[:, None, :2, :3]).sum(0).reshape(4, -1)
    expected = v @ torch.softmax(q @ k, 0)
    torch.testing.assert_close(out[0, :4, 5, 6], expected)
