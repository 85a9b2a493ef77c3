"""RGA_Module parity with the original (fixtures rga_s/c/sc_stage3) and low-rank (backend "auto") == direct
("reference")."""
from __future__ import annotations

import pytest
import torch

from conftest import load_case
from zoo.layers.rga import RGA_Module, relation_conv_direct, relation_conv_low_rank

CASES = ["rga_s_stage3", "rga_c_stage3", "rga_sc_stage3"]


def _build(case: str, backend: str, dtype=torch.float32):
    """The module of a fixture case with its stored weights, plus the case's tensors."""
    meta, tensors = load_case("rga", case)
    kwargs = {k: v for k, v in meta["constructor"].items() if k != "class"}
    module = RGA_Module(**kwargs, backend=backend)
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    # the fixture state is torch-0.4 style: no num_batches_tracked, otherwise the same keys
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return meta, tensors, module.to(dtype)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_keys_match_original(case):
    meta, tensors, module = _build(case, backend="auto")
    ours = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    original = [k[len("state."):] for k in meta["tensors"] if k.startswith("state.")]
    assert ours == original  # same names in the same (registration) order
    for key in ours:
        assert module.state_dict()[key].shape == tensors["state." + key].shape


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["low_rank", "direct"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_eval_outputs_and_logits(case, backend, dtype):
    meta, t, module = _build(case, backend, dtype)
    module.eval()
    with torch.no_grad():
        out, spatial, channel = module.forward_with_logits(t["input"].to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), t["output"], rtol=1e-4, atol=1e-4)
    if meta["constructor"]["use_spatial"]:
        torch.testing.assert_close(spatial.float(), t["spatial_logits"], rtol=1e-4, atol=1e-4)
    else:
        assert spatial is None
    if meta["constructor"]["use_channel"]:
        torch.testing.assert_close(channel.float(), t["channel_logits"], rtol=1e-4, atol=1e-4)
    else:
        assert channel is None


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["low_rank", "direct"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_float64(case, backend):
    meta, t, module = _build(case, backend, torch.float64)
    module.eval()
    x = t["input"].double().clone().requires_grad_()
    out = module(x)
    (out * t["grad_output"].double()).sum().backward()

    def check(actual, ref, name):
        ref = ref.double()
        torch.testing.assert_close(actual, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)

    check(x.grad, t["grad_input"], "grad_input")
    params = dict(module.named_parameters())
    assert meta["param_grads_stored_for"]
    for key in meta["param_grads_stored_for"]:
        check(params[key].grad, t["grad_" + key], "grad_" + key)


def test_gradients_float32_relative_l2():
    """A float32 candidate: relative L2 error <= 2e-2 per tensor (README)."""
    meta, t, module = _build("rga_sc_stage3", "auto", torch.float32)
    module.eval()
    x = t["input"].clone().requires_grad_()
    (module(x) * t["grad_output"]).sum().backward()
    params = dict(module.named_parameters())
    pairs = [(x.grad, t["grad_input"])] + [(params[k].grad, t["grad_" + k]) for k in meta["param_grads_stored_for"]]
    for actual, ref in pairs:
        assert ((actual - ref).norm() / ref.norm()).item() <= 2e-2


@pytest.mark.parametrize("case", CASES)
def test_train_mode_low_rank_equals_direct(case):
    """Training mode (batch statistics, running-stat updates, gradients): both forms agree."""
    _, t, fast = _build(case, "auto", torch.float64)
    _, _, direct = _build(case, "reference", torch.float64)
    fast.train()
    direct.train()
    x = t["input"].double()
    if x.shape[0] < 2:  # batch statistics need more than one sample
        x = torch.cat([x, x.flip(-1) * 0.5])
    x_fast, x_direct = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_direct = fast(x_fast), direct(x_direct)
    torch.testing.assert_close(out_fast, out_direct, rtol=1e-9, atol=1e-10)
    g = torch.randn(out_fast.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out_fast * g).sum().backward()
    (out_direct * g).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_direct.grad, rtol=1e-8, atol=1e-10)
    direct_params = dict(direct.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, direct_params[name].grad, rtol=1e-7, atol=1e-9 * (1 + p.grad.abs().max().item()))
    direct_state = direct.state_dict()
    for name, value in fast.state_dict().items():  # running statistics updated identically
        torch.testing.assert_close(value, direct_state[name], rtol=1e-9, atol=1e-12)
    # and in training mode the module really uses batch statistics (differs from eval mode)
    fast.eval()
    with torch.no_grad():
        assert not torch.allclose(fast(x), out_fast.detach(), atol=1e-3)


def test_relation_conv_identity_random():
    """The low-rank identity on random shapes, including M != D != K."""
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64)  # [B, M, D]
    phi = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 22, generator=gen, dtype=torch.float64)  # [K, 2M]
    torch.testing.assert_close(relation_conv_low_rank(theta, phi, weight), relation_conv_direct(theta, phi, weight))
    # the direct form literally is: relation feature of position i = [R[i, :], R[:, i]], then the conv
    relation = theta @ phi.transpose(1, 2)
    i = 4
    feature = torch.cat([relation[:, i, :], relation[:, :, i]], dim=1)  # [B, 2M]
    torch.testing.assert_close(relation_conv_direct(theta, phi, weight)[:, i, :], feature @ weight.t())


def test_parameter_counts_match_spec_table():
    """Spec §1.6: parameters of rga_att1..4 (S / C / SC) at 256x128."""
    sizes = [(256, 2048), (512, 512), (1024, 128), (2048, 128)]
    expected = [(1082178, 1590994, 2673172), (164898, 164898, 329796),
                (398154, 270754, 668908), (1578570, 1063650, 2642220)]
    for (c, n), (s, ch, sc) in zip(sizes, expected):
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(RGA_Module(c, n, use_channel=False)) == s
        assert count(RGA_Module(c, n, use_spatial=False)) == ch
        assert count(RGA_Module(c, n)) == sc


def test_bad_input_errors():
    module = RGA_Module(64, 64)
    with pytest.raises(ValueError, match="in_spatial=64"):
        module(torch.randn(1, 64, 8, 9))
    with pytest.raises(ValueError, match="in_channel=64"):
        module(torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        module(torch.randn(64, 8, 8))
    with pytest.raises(ValueError, match="hidden width"):
        RGA_Module(64, 16)  # N' = 2: W_spatial hidden (1 + 2) // 8 = 0
    with pytest.raises(ValueError, match="use_spatial"):
        RGA_Module(64, 16, use_spatial=False, use_channel=False)
    with pytest.raises(ValueError, match=">= 1"):
        RGA_Module(4, 16)  # C' = 4 // 8 = 0


class _LargestTensor:
    """Records the largest tensor any op produces (a TorchDispatchMode, created lazily)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            largest = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        Mode.largest = max(Mode.largest, t.numel())
                return out

        return Mode()


@pytest.mark.parametrize("channels,positions,height", [(64, 1024, 32), (1024, 64, 8)], ids=["spatial", "channel"])
def test_low_rank_never_materialises_the_relation(channels, positions, height, monkeypatch):
    """The spatial relation is N x N, the channel one C x C (16x the input here, as at rga_att1 /
    rga_att4 of the network); the fast form creates no tensor that big, the direct one does."""
    monkeypatch.delenv("RELZOO_OPS", raising=False)  # "auto" is the fast form unless RELZOO_OPS=reference
    x = torch.rand(1, channels, height, positions // height)
    relation_size = max(channels, positions) ** 2
    for backend, expect_relation in (("auto", False), ("reference", True)):
        module = RGA_Module(channels, positions, backend=backend).eval()
        mode = _LargestTensor()
        with torch.no_grad(), mode:
            module(x)
        assert (mode.largest >= relation_size) == expect_relation, (backend, mode.largest)
