"""The one backend switch (zoo/ops/backend.py) on every layer family.

Every backend a layer has gives the reference's outputs and gradients; a bad backend name, or a bad
``RELZOO_OPS``, is an error listing the valid values; ``RELZOO_OPS`` is what ``backend="auto"`` means;
the older ``low_rank=`` / ``impl=`` spellings still work, with a DeprecationWarning.
The attention layers' ``"flex"`` backend (inference only on CPU) is tested in test_relative_attn.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from zoo import ops
from zoo.errors import ConfigError
from zoo.layers import rsa as rsa_layers
from zoo.layers.irpe import RPEAttention, RPEMultiheadAttention, get_rpe_config, get_single_rpe_config, iRPE
from zoo.layers.rga import RGA_Module
from zoo.layers.rpa import MultiheadNonlocal1d, MultiheadNonlocal2d, MultiheadNonlocal3d, _MultiheadNonlocalNd
from zoo.layers.rsa import RSA
from zoo.layers.sasa import AttentionConv, AttentionStem, RelativeSelfAttention, SASAttention2d
from zoo.ops.backend import ATTENTION_BACKENDS, NEIGHBORHOOD_BACKENDS

ALL = ("auto", "native", "reference")
PURE = ("auto", "reference")
ATTENTION = ("auto", "sdpa", "native", "reference")  # and "flex": test_relative_attn.py (no CPU backward)
ATTENTION_LAYERS = (RPEMultiheadAttention, RPEAttention, _MultiheadNonlocalNd)


def _irpe_attention(method: str) -> torch.nn.Module:
    """iRPE on queries, keys and values (contextual, one skip token), inside the DeiT attention block."""
    config = get_rpe_config(ratio=1.9, method=method, mode="ctx", shared_head=False, skip=1, rpe_on="qkv")
    return RPEAttention(16, num_heads=2, rpe_config=config)


class _SelfAttention(torch.nn.Module):
    """DETR's call of RPEMultiheadAttention: x as query, key and value, padding of the second image's last
    keys, and an additive float mask; returns the output only (need_weights=False: the fused paths)."""

    def __init__(self, attn: RPEMultiheadAttention, hw=None, key_length=None):
        super().__init__()
        self.attn, self.hw, self.key_length = attn, hw, key_length

    def forward(self, x):
        kv = x if self.key_length is None else x[: self.key_length]
        padding = torch.zeros(x.shape[1], kv.shape[0], dtype=torch.bool)
        padding[-1, -3:] = True
        mask = torch.linspace(-1, 1, x.shape[0] * kv.shape[0], dtype=x.dtype).view(x.shape[0], kv.shape[0])
        return self.attn(x, kv, kv, key_padding_mask=padding, attn_mask=mask, need_weights=False, hw=self.hw)[0]


def _irpe_mha(spec: str, hw) -> torch.nn.Module:
    config = get_rpe_config(**dict(zip(("ratio", "method", "mode", "shared_head", "rpe_on"), spec)))
    return _SelfAttention(RPEMultiheadAttention(16, 2, dropout=0.3, rpe_config=config), hw=hw)


RA = "relative_attn"  # the fused attention's native op

# family: (layer, input shape, forward kwargs, backends, native op)
FAMILIES = {
    "irpe_product": (lambda: _irpe_attention("product"), (2, 1 + 4 * 5, 16), {"hw": (4, 5)}, ATTENTION, RA),
    "irpe_cross": (lambda: _irpe_attention("cross"), (2, 1 + 3 * 4, 16), {"hw": (3, 4)}, ATTENTION, RA),
    "irpe_mha_k": (lambda: _irpe_mha((2.0, "product", "ctx", True, "k"), (3, 5)), (15, 2, 16), {}, ATTENTION, RA),
    "irpe_mha_bias_qk": (lambda: _irpe_mha((1.9, "euc", "bias", False, "qk"), (5, 3)), (15, 2, 16), {}, ATTENTION,
                         RA),
    "irpe_mha_cross_qkv": (lambda: _irpe_mha((1.9, "cross", "ctx", False, "qkv"), (3, 4)), (12, 2, 16), {},
                           ATTENTION, RA),
    "mha_plain": (lambda: _SelfAttention(RPEMultiheadAttention(16, 2), key_length=9), (11, 2, 16), {}, ATTENTION, RA),
    "deit_plain": (lambda: RPEAttention(16, num_heads=4, qkv_bias=True), (1, 7, 16), {}, ATTENTION, RA),
    "rpa_plain": (lambda: MultiheadNonlocal2d(6, 3, num_heads=2), (2, 6, 3, 5), {}, ATTENTION, RA),
    "rga_sc": (lambda: RGA_Module(16, 20, cha_ratio=4, spa_ratio=4, down_ratio=2), (2, 16, 4, 5), {}, PURE, None),
    "rsa": (lambda: RSA(8, 8, nh=2, dk=0, dv=0, dd=0, kernel_size=(3, 3, 3), kernel_type="VplusR",
                        feat_type="VplusR"), (2, 8, 3, 4, 5), {}, PURE, None),
    "sasa_paper": (lambda: SASAttention2d(8, 8, kernel_size=3, stride=2, heads=2), (2, 8, 5, 6), {}, ALL,
                   "neighborhood_attn"),
    "sasa_notebook": (lambda: RelativeSelfAttention(8, 8, ks=3, groups=2, stride=2), (2, 8, 5, 6), {}, ALL,
                      "neighborhood_attn"),
    "sasa_attention_conv": (lambda: AttentionConv(8, 8, 3, padding=1, groups=2), (2, 8, 5, 6), {}, ALL,
                            "neighborhood_attn"),
    "sasa_attention_stem": (lambda: AttentionStem(8, 8, 4, padding=2, groups=2, m=2), (2, 8, 5, 6), {}, ALL,
                            "neighborhood_attn"),
    "rpa_1d": (lambda: MultiheadNonlocal1d(6, 3, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                           rpa_zero_init=False), (2, 6, 7), {}, ATTENTION, RA),
    "rpa_2d": (lambda: MultiheadNonlocal2d(6, 3, num_heads=2, kernel_size=3, padding=1, rpa_mode="relative_distance",
                                           rpa_kernel_size=4, rpa_interpolation="lerp", rpa_zero_init=False),
               (2, 6, 5, 7), {}, ATTENTION, RA),
    "rpa_2d_legacy": (lambda: MultiheadNonlocal2d(6, 3, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                                  rpa_interpolation="lerp", rpa_zero_init=False, bug_compatible=True),
                      (1, 6, 3, 5), {}, ATTENTION, RA),
    "rpa_3d": (lambda: MultiheadNonlocal3d(6, 3, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                           rpa_interpolation="slerp", rpa_zero_init=False), (1, 6, 2, 3, 4), {},
               ATTENTION, RA),
}
CASES = [(family, backend) for family, entry in FAMILIES.items() for backend in entry[3] if backend != "reference"]


def _set_backend(model: torch.nn.Module, backend: str) -> None:
    """The ``backend`` attribute of every layer in ``model`` (users may set it after construction): the
    attention layers take every attention backend, their iRPE modules (the index step) the op backends."""
    for module in model.modules():
        if isinstance(module, ATTENTION_LAYERS) or (hasattr(module, "backend") and backend in ALL):
            module.backend = backend


def _outputs_and_gradients(layer, backend, x, forward_kwargs):
    layer = copy.deepcopy(layer)
    _set_backend(layer, backend)
    x = x.clone().requires_grad_(True)
    out = layer(x, **forward_kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = list(layer.parameters())
    grads = torch.autograd.grad((out * upstream).sum(), [x, *params], allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("family,backend", CASES)
def test_every_backend_equals_the_reference(family, backend):
    """Outputs and gradients (input and every parameter) in float64, on small random inputs."""
    make, shape, forward_kwargs, _, native_op = FAMILIES[family]
    if backend == "native" and ops.get_op(native_op) is None:
        pytest.skip(f"native op '{native_op}' is not available here (RELZOO_OPS or no compiler)")
    torch.manual_seed(0)
    layer = make().double().eval()  # eval: dropout off (each path draws its own dropout mask)
    with torch.no_grad():  # random tables: iRPE's start at zero, which would hide its relative terms
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = _outputs_and_gradients(layer, backend, x, forward_kwargs)
    ref_out, ref_grads = _outputs_and_gradients(layer, "reference", x, forward_kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (ref is None), f"gradient {i}: present in one backend only"
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-10, msg=lambda m: f"gradient {i}: {m}")


# every layer with more than one implementation: (constructor taking backend=..., its backends)
CONSTRUCTORS = {
    "iRPE": (lambda **kw: iRPE(head_dim=4, mode="ctx", method="product", num_buckets=49,
                               rpe_config=get_single_rpe_config(), **kw), ALL),
    "RGA_Module": (lambda **kw: RGA_Module(64, 64, **kw), PURE),
    "RSA": (lambda **kw: RSA(8, 8, **kw), PURE),
    "SASAttention2d": (lambda **kw: SASAttention2d(8, 8, heads=2, **kw), NEIGHBORHOOD_BACKENDS),
    "RelativeSelfAttention": (lambda **kw: RelativeSelfAttention(8, 8, 3, 2, **kw), NEIGHBORHOOD_BACKENDS),
    "AttentionConv": (lambda **kw: AttentionConv(8, 8, 3, padding=1, **kw), NEIGHBORHOOD_BACKENDS),
    "AttentionStem": (lambda **kw: AttentionStem(8, 8, 4, padding=2, **kw), ALL),
    "MultiheadNonlocal1d": (lambda **kw: MultiheadNonlocal1d(4, **kw), ATTENTION_BACKENDS),
    "MultiheadNonlocal2d": (lambda **kw: MultiheadNonlocal2d(4, **kw), ATTENTION_BACKENDS),
    "MultiheadNonlocal3d": (lambda **kw: MultiheadNonlocal3d(4, **kw), ATTENTION_BACKENDS),
    "RPEMultiheadAttention": (lambda **kw: RPEMultiheadAttention(8, 2, **kw), ATTENTION_BACKENDS),
    "RPEAttention": (lambda **kw: RPEAttention(8, 2, **kw), ATTENTION_BACKENDS),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_a_bad_backend_name_lists_the_valid_ones(name):
    make, backends = CONSTRUCTORS[name]
    valid = ", ".join(repr(b) for b in backends)
    for bad in ["fast", "Native", None, *(("native",) if "native" not in backends else ())]:
        with pytest.raises(ConfigError, match=f"{name} backend must be one of {valid}, got {bad!r}"):
            make(backend=bad)
    assert all(make(backend=b).backend == b for b in backends)


def test_a_bad_backend_attribute_is_refused_when_the_layer_runs():
    layer = RGA_Module(64, 64)
    layer.backend = "fused"
    with pytest.raises(ConfigError, match="RGA_Module backend must be one of 'auto', 'reference', got 'fused'"):
        layer(torch.randn(1, 64, 8, 8))


def test_a_bad_backend_name_for_the_ops():
    x, index = torch.randn(2, 4, 3), torch.randint(0, 3, (4, 6))
    with pytest.raises(ConfigError, match="backend must be one of 'auto', 'native', 'reference', got 'fast'"):
        ops.rpe_index(x, index, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'flex', 'native', 'reference'"):
        ops.neighborhood_attention(*(torch.randn(1, 1, 3, 3, 2) for _ in range(3)), kernel_size=3, backend="fast")
    with pytest.raises(ConfigError, match="relative_attention backend must be one of 'auto', 'sdpa', 'flex', "
                                          "'native', 'reference', got 'fast'"):
        ops.relative_attention(*(torch.randn(1, 1, 3, 2) for _ in range(3)), backend="fast")


def test_relzoo_ops_bogus_lists_the_valid_values(monkeypatch):
    monkeypatch.setenv("RELZOO_OPS", "bogus")
    message = "RELZOO_OPS='bogus' is not one of auto, native, reference"
    with pytest.raises(ConfigError, match=message):
        ops.mode()
    with pytest.raises(ConfigError, match=message):
        RGA_Module(64, 64)(torch.randn(1, 64, 8, 8))
    with pytest.raises(ConfigError, match=message):
        ops.rpe_index(torch.randn(2, 4, 3), torch.randint(0, 3, (4, 6)))
    # an explicit backend does not need the default
    ops.rpe_index(torch.randn(2, 4, 3), torch.randint(0, 3, (4, 6)), backend="reference")


@pytest.mark.parametrize("relzoo_ops,runs", [("auto", "chunked"), ("native", "chunked"), ("reference", "reference"),
                                             (None, "chunked")])
def test_relzoo_ops_is_what_auto_means(monkeypatch, relzoo_ops, runs):
    """RSA has no native op: RELZOO_OPS=reference selects its reference, anything else its fast path;
    an explicit backend wins over RELZOO_OPS."""
    if relzoo_ops is None:
        monkeypatch.delenv("RELZOO_OPS", raising=False)
    else:
        monkeypatch.setenv("RELZOO_OPS", relzoo_ops)
    calls = []

    def recorded(name):
        real = getattr(rsa_layers, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in ("rsa_core_reference", "rsa_core_chunked"):
        monkeypatch.setattr(rsa_layers, name, recorded(name))
    x = torch.randn(1, 8, 2, 3, 3)
    RSA(8, 8, kernel_size=(1, 3, 3))(x)
    RSA(8, 8, kernel_size=(1, 3, 3), backend="reference")(x)
    assert calls == [f"rsa_core_{runs}", "rsa_core_reference"]


def test_older_spellings_warn_and_name_the_backend():
    with pytest.warns(DeprecationWarning, match=r"RGA_Module\(low_rank=False\) is deprecated: use backend='reference'"):
        assert RGA_Module(64, 64, low_rank=False).backend == "reference"
    with pytest.warns(DeprecationWarning, match=r"RGA_Module\(low_rank=True\) is deprecated: use backend='auto'"):
        assert RGA_Module(64, 64, low_rank=True).backend == "auto"
    with pytest.warns(DeprecationWarning, match=r"RSA\(impl='chunked'\) is deprecated: use backend='auto'"):
        assert RSA(8, 8, impl="chunked").backend == "auto"
    with pytest.warns(DeprecationWarning, match=r"RSA\(impl='reference'\) is deprecated: use backend='reference'"):
        assert RSA(8, 8, impl="reference").backend == "reference"
    with pytest.raises(ConfigError, match="contradicts backend='reference'"):
        RSA(8, 8, impl="chunked", backend="reference")
