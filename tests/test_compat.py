"""zoo.compat: the originals' APIs under their own names, bug for bug by default.

For every compat module: the golden fixtures of the original code pass with the compat defaults and no
extra arguments, and the original's example code (its README's, or the way its own code calls the module)
runs with only the import line changed. The compat defaults differ from zoo.layers' corrected ones.
"""
from __future__ import annotations

import glob
import os
import textwrap

import pytest
import torch

from conftest import FIXTURES_ROOT, fixture_dir, load_case
from zoo.checkpoint import load_checkpoint


def _cases(family: str, prefix: str) -> list[str]:
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(str(FIXTURES_ROOT / family / f"{prefix}*.json")))
    return names or [f"{prefix}(fixtures absent)"]


def _state(tensors: dict, prefix: str = "state.") -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _run_original_code(source: str, **names) -> dict:
    """Execute a snippet of an original's code (dedented) with ``names`` in scope; returns its namespace."""
    namespace = dict(names)
    exec(compile(textwrap.dedent(source), "<original example>", "exec"), namespace)
    return namespace


# ------------------------------------------------------------------------------------------------- rpa_sa

def test_rpa_sa_module_fixtures_with_compat_defaults():
    from zoo.compat.rpa_sa import MultiheadNonlocal2d

    checked = 0
    for case in _cases("rpa", "nl2d_"):
        if case.endswith("_fixedpad"):  # made with the corrected pad order: not what the original module does
            continue
        meta, t = load_case("rpa", case)
        block = MultiheadNonlocal2d(**meta["ctor"])
        block.load_state_dict(_state(t))
        x = t["input"].clone().requires_grad_()
        out = block(x)
        (out * t["grad_output"]).sum().backward()
        tol_out, tol_grad = meta["tolerance"]["output"], meta["tolerance"]["grads"]
        torch.testing.assert_close(out, t["output"], **tol_out, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(x.grad, t["grad_input"], **tol_grad, msg=lambda m: f"{case}: {m}")
        for name, param in block.named_parameters():
            torch.testing.assert_close(param.grad, t[f"grad_{name}"], **tol_grad, msg=lambda m: f"{case} {name}: {m}")
        checked += 1
    assert checked >= 10


def test_rpa_sa_defaults_are_the_originals_and_layers_stay_corrected():
    from zoo.compat import rpa_sa
    from zoo.layers import rpa

    meta, t = load_case("rpa", "nl2d_rp_slerp_9x13")  # non-square: the original's transposed table
    compat, fixed = rpa_sa.MultiheadNonlocal2d(**meta["ctor"]), rpa.MultiheadNonlocal2d(**meta["ctor"])
    assert compat.bug_compatible and not fixed.bug_compatible and isinstance(compat, rpa.MultiheadNonlocal2d)
    for block in (compat, fixed):
        block.load_state_dict(_state(t))
    with torch.no_grad():
        torch.testing.assert_close(compat(t["input"]), t["output"], **meta["tolerance"]["output"])
        assert not torch.allclose(fixed(t["input"]), t["output"], rtol=1e-2, atol=1e-3)
    assert not rpa_sa.MultiheadNonlocal2d(8, rpa_mode="relative_position", bug_compatible=False).bug_compatible


_OP_SCHEMAS = {
    "rotative_pad2d": "rpa_sa::rotative_pad2d(Tensor input, int[] pad, str interpolation) -> Tensor",
    "spherical_pad2d": "rpa_sa::spherical_pad2d(Tensor input, int[] pad, str interpolation) -> Tensor",
    "relative_attend_query2d":
        "rpa_sa::relative_attend_query2d(Tensor query, Tensor affinity, int height, int width) -> Tensor",
    "relative_attend_weight2d":
        "rpa_sa::relative_attend_weight2d(Tensor weight, Tensor affinity, int height, int width) -> Tensor",
}


def test_rpa_sa_registers_the_ops_with_the_original_schemas():
    from zoo.compat import rpa_sa

    for name, schema in _OP_SCHEMAS.items():
        assert str(getattr(torch.ops.rpa_sa, name).default._schema) == schema
    assert torch.ops.rpa_sa._cuda_version() == -1 and rpa_sa._HAS_OPS


@pytest.mark.parametrize("case", _cases("rpa", "op_"))
def test_rpa_sa_ops_match_fixtures_through_torch_ops_and_the_module(case):
    from zoo.compat import rpa_sa

    meta, t = load_case("rpa", case)
    name, args = meta["op"].split(".")[-1], meta["args"]
    for op in (getattr(torch.ops.rpa_sa, name), getattr(rpa_sa, name)):
        inputs = {k: t[k].clone().requires_grad_() for k in args["tensors"]}
        if "pad" in args:
            out = op(inputs["input"], args["pad"], interpolation=args["interpolation"])
        else:
            out = op(*inputs.values(), args["height"], args["width"])
        (out * t["grad_output"]).sum().backward()
        torch.testing.assert_close(out, t["output"], **meta["tolerance"]["output"])
        for k, tensor in inputs.items():
            torch.testing.assert_close(tensor.grad, t[f"grad_{k}"], **meta["tolerance"]["grads"])
    # the backward ops of the original's schema give the same gradients
    inputs = [t[k] for k in args["tensors"]]
    extra = [args["pad"], args["interpolation"]] if "pad" in args else [args["height"], args["width"]]
    grads = getattr(torch.ops.rpa_sa, f"_{name}_backward")(t["grad_output"], *inputs, *extra)
    for k, g in zip(args["tensors"], grads if isinstance(grads, (tuple, list)) else [grads]):
        torch.testing.assert_close(g, t[f"grad_{k}"], **meta["tolerance"]["grads"])


def test_rpa_sa_legacy_table_layout_through_the_op():
    """The original module hands the attend op a transposed (d, 2W-1, 2H-1) table on non-square maps; the op
    reads it through its own row length, as the original kernel did (in bounds for H <= W)."""
    from zoo.compat import rpa_sa
    from zoo.layers.rpa import relative_attend_query_reference

    q, table = torch.randn(2, 3, 4 * 6, dtype=torch.float64), torch.randn(3, 11, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.rpa_sa.relative_attend_query2d(q, table, 4, 6),
                               relative_attend_query_reference(q, table, (4, 6)))
    with pytest.raises(ValueError, match="reads past"):
        rpa_sa.relative_attend_query2d(torch.randn(1, 3, 24), torch.randn(3, 7, 11)[:, :5], 6, 4)


def test_rpa_sa_readme_example_runs_with_the_import_line_changed():
    # README "Example" (only `from rpa_sa import ...` changed)
    ns = _run_original_code("""
        import torch

        from zoo.compat.rpa_sa import MultiheadNonlocal2d

        model = MultiheadNonlocal2d(in_channels=8,
                                    rpa_mode='relative_position',
                                    rpa_kernel_size=5,
                                    rpa_interpolation='slerp')

        x = torch.rand(1, 8, 12, 12)
        out = model(x)
    """)
    assert ns["out"].shape == (1, 8, 12, 12)


@pytest.mark.slow  # gradcheck's 3528 backward passes: a few seconds alone, a minute on a busy machine
def test_rpa_sa_original_op_tests_run_with_the_load_line_changed():
    import zoo.compat.rpa_sa  # noqa: F401  (replaces the scripts' torch.ops.load_library("../rpa_sa/_C...pyd"))

    # tests/test_spherical_pad2d.py and test_rotative_pad2d.py: forward/backward and gradcheck of the ops
    ns = _run_original_code("""
        import math
        batch_sz, height, width, channels, affinity_h, affinity_w = 1, 11, 11, 8, 5, 5
        padded_shape = (height - affinity_h // 2 - 1, width - affinity_w // 2 - 1)
        pad_u = math.ceil(padded_shape[0]); pad_d = math.floor(padded_shape[0])
        pad_l = math.ceil(padded_shape[1]); pad_r = math.floor(padded_shape[1])
        x = torch.rand(batch_sz, channels, affinity_h, affinity_w, dtype=torch.float64, requires_grad=True)
        out = torch.ops.rpa_sa.spherical_pad2d(x, (pad_l, pad_r, pad_u, pad_d), interpolation='nearest')
        out.backward(torch.ones_like(out))
        true_grad = torch.autograd.gradcheck(lambda _: torch.ops.rpa_sa.spherical_pad2d(
            x, (pad_l, pad_r, pad_u, pad_d), interpolation='slerp'), inputs=(x,), nondet_tol=1e-5)
        r = torch.rand(batch_sz, channels, 6, dtype=torch.float64, requires_grad=True)
        rout = torch.ops.rpa_sa.rotative_pad2d(r, (width - 1, width - 1, height - 1, height - 1), interpolation='lerp')
        rout.backward(torch.ones_like(rout))
        rotative_grad = torch.autograd.gradcheck(lambda _: torch.ops.rpa_sa.rotative_pad2d(
            r, (width - 1, width - 1, height - 1, height - 1), interpolation='nearest'), inputs=(r,), nondet_tol=1e-5)
    """, torch=torch)
    assert ns["out"].shape == (1, 8, 21, 21) and ns["x"].grad.shape == (1, 8, 5, 5) and ns["true_grad"]
    assert ns["rout"].shape == (1, 8, 21, 21) and ns["rotative_grad"]


_RPA_TOY = """
    import torch
    import torch.nn as nn

    from zoo.compat.rpa_sa import MultiheadNonlocal2d


    class RelativePositionAwareModel(nn.Module):
        def __init__(self, num_classes):
            super(RelativePositionAwareModel, self).__init__()
            self.layer1 = nn.Sequential(
                nn.Conv2d(3, 16, kernel_size=(3, 3)),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, kernel_size=(3, 3)),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.pool1 = nn.AvgPool2d(kernel_size=(2, 2))
            self.nl1 = nn.Sequential(
                MultiheadNonlocal2d(in_channels=32,
                                    rpa_mode='relative_position',
                                    rpa_kernel_size=7,
                                    rpa_interpolation='lerp'),
                nn.BatchNorm2d(32)
            )

            self.layer2 = nn.Sequential(
                nn.Conv2d(32, 64, kernel_size=(3, 3)),
                nn.BatchNorm2d(64),
                nn.ReLU()
            )
            self.pool2 = nn.AvgPool2d(kernel_size=(2, 2))
            self.nl2 = nn.Sequential(
                MultiheadNonlocal2d(in_channels=64,
                                    rpa_mode='relative_position',
                                    rpa_kernel_size=7,
                                    rpa_interpolation='lerp'),
                nn.BatchNorm2d(64)
            )
            self.global_pool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.layer1(x)
            x = self.pool1(x)
            x = self.nl1(x)

            x = self.layer2(x)
            x = self.pool2(x)
            x = self.nl2(x)

            x = self.global_pool(x).flatten(1)

            x = self.fc(x)
            return x
"""


def test_rpa_sa_original_toy_network_loads_its_checkpoint_and_matches():
    """The original tests' RelativePositionAwareModel, verbatim but for the import: 'lerp' must mean nearest."""
    meta, t = load_case("rpa", "toy_cifar_rpanet")
    model = _run_original_code(_RPA_TOY)["RelativePositionAwareModel"](num_classes=10)
    model.load_state_dict(load_checkpoint(fixture_dir("rpa") / "toy_cifar_rpanet.pt"))
    model.eval()
    x = t["input"].clone().requires_grad_()
    out = model(x)
    torch.testing.assert_close(out, t["output"], **meta["tolerance"]["output"])
    (out * t["grad_output"]).sum().backward()
    torch.testing.assert_close(x.grad, t["grad_input"], **meta["tolerance"]["grads"])


# --------------------------------------------------------------------------------------------------- irpe

def test_irpe_bucket_functions_return_what_the_originals_do():
    from zoo.compat import irpe

    meta, t = load_case("irpe", "tables")
    key = "buckets.product.r1.9.h14w14.skip1"
    ids, num_buckets = irpe.get_bucket_ids_2d(irpe.METHOD.PRODUCT, 14, 14, 1, 1.9, 3.8, 15.2)
    assert torch.equal(ids, t[key].long()) and num_buckets == meta["buckets"][key]["num_buckets_incl_skip"] == 50
    ids, num_buckets, length = irpe.get_bucket_ids_2d_without_skip(irpe.METHOD.PRODUCT, 14, 14, 1.9, 3.8, 15.2)
    assert torch.equal(ids, t[key].long()[1:, 1:]) and (num_buckets, length) == (49, 196)
    offsets = t["piecewise.offsets"].long()
    assert torch.equal(irpe.piecewise_index(offsets, 2.0, 4.0, 16.0, torch.long), t["piecewise.r2.0"].long())
    pos = irpe.get_absolute_positions(2, 3, torch.long, "cpu")
    assert pos.shape == (2, 3, 2) and pos[1, 2].tolist() == [1, 2]
    ids, count = irpe.quantize_values(torch.tensor([5, -1, 5, 7]))
    assert ids.tolist() == [1, 0, 1, 2] and count == 3


@pytest.mark.parametrize("case", _cases("irpe", "irpe_"))
def test_irpe_module_fixtures_with_the_original_api(case):
    from zoo.compat.irpe import build_rpe, get_rpe_config

    meta, t = load_case("irpe", case)
    c = meta["constructor"]
    config = get_rpe_config(ratio=c["ratio"], method=c["method"], mode=c["mode"], shared_head=bool(c["shared_head"]),
                            skip=c["skip"], rpe_on="k" if c["transposed"] else "v")
    module = build_rpe(config, head_dim=c["head_dim"], num_heads=c["num_heads"])[1 if c["transposed"] else 2]
    module = module.double()
    module.load_state_dict(_state(t, "param."), strict=True)
    x = t["input"].clone().requires_grad_(True)
    out = module(x, height=meta["call"]["height"], width=meta["call"]["width"])
    tol = meta["tolerance"]
    torch.testing.assert_close(out, t["output"], atol=tol["output"]["atol"], rtol=tol["output"]["rtol"])
    out.backward(t["grad_output"])
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, t[f"grad_param.{name}"], atol=tol["grads"]["atol"], rtol=tol["grads"]["rtol"])


@pytest.mark.parametrize("case", _cases("irpe", "mha_"))
def test_irpe_rpe_multihead_attention_fixtures(case):
    from zoo.compat.irpe import RPEMultiheadAttention, get_rpe_config

    meta, t = load_case("irpe", case)
    _, ratio, method, mode, shared, rpe_on = meta["spec"].split("-")
    c = meta["constructor"]
    attn = RPEMultiheadAttention(c["embed_dim"], c["num_heads"], dropout=c["dropout"], bias=c["bias"],
                                 rpe_config=get_rpe_config(float(ratio), method, mode, bool(int(shared)), 0, rpe_on))
    attn.load_state_dict(_state(t, "param."), strict=True)
    attn.eval()
    with torch.no_grad():
        out, weights = attn(t["query"], t["query"], t["value"], key_padding_mask=t["key_padding_mask"].bool(),
                            hw=tuple(meta["hw"]))
    tol = meta["tolerance"]
    torch.testing.assert_close(out, t["output"], atol=tol["output"]["atol"], rtol=tol["output"]["rtol"])
    torch.testing.assert_close(weights, t["attn_weights"], atol=tol["attn_weights"]["atol"],
                               rtol=tol["attn_weights"]["rtol"])


_IRPE_README = """
    import torch
    import torch.nn as nn

    from zoo.compat.irpe import get_rpe_config
    from zoo.compat.irpe import build_rpe

    rpe_config = get_rpe_config(
        ratio=1.9,
        method="product",
        mode='ctx',
        shared_head=True,
        skip=1,
        rpe_on='qkv',
    )


    class Attention(nn.Module):
        # README steps 3 and 4 inside DeiT-with-iRPE's attention block
        def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                     rpe_config=None):
            super().__init__()
            self.num_heads = num_heads
            head_dim = dim // num_heads
            self.scale = qk_scale or head_dim ** -0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.attn_drop = nn.Dropout(attn_drop)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)

            # image relative position encoding
            self.rpe_q, self.rpe_k, self.rpe_v = \\
                build_rpe(rpe_config,
                          head_dim=head_dim,
                          num_heads=num_heads)

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            q *= self.scale
            attn = (q @ k.transpose(-2, -1))

            # image relative position on keys
            if self.rpe_k is not None:
                attn += self.rpe_k(q)

            # image relative position on queries
            if self.rpe_q is not None:
                attn += self.rpe_q(k * self.scale).transpose(2, 3)

            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)

            out = attn @ v

            # image relative position on values
            if self.rpe_v is not None:
                out += self.rpe_v(attn)

            x = out.transpose(1, 2).reshape(B, N, C)
            x = self.proj(x)
            x = self.proj_drop(x)
            return x

    # irpe.py's own __main__
    config = get_rpe_config(skip=1)
    rpe = build_rpe(config, head_dim=32, num_heads=4)
"""


def test_irpe_readme_code_runs_with_the_import_line_changed():
    """The README's three steps, unchanged but for the imports, give the fixture-checked RPEAttention's numbers."""
    from zoo.layers.irpe import RPEAttention, iRPE

    ns = _run_original_code(_IRPE_README)
    assert ns["rpe"][0] is None and isinstance(ns["rpe"][1], iRPE) and ns["rpe"][1].num_buckets == 50
    torch.manual_seed(0)
    theirs = ns["Attention"](64, num_heads=4, qkv_bias=True, rpe_config=ns["rpe_config"]).eval()
    for name, p in theirs.named_parameters():
        if "lookup_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    ours = RPEAttention(64, num_heads=4, qkv_bias=True, rpe_config=ns["rpe_config"]).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 1 + 4 * 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- sasa_notebook

def _assert_sasa_case(layer: torch.nn.Module, t: dict, tol: dict) -> None:
    """A SASA fixture case (spec layout: input, output, grad_output, grad_input, grad_<param>) through ``layer``."""
    layer.load_state_dict(_state(t))
    x = t["input"].clone().requires_grad_()
    out = layer(x)
    (out * t["grad_output"]).sum().backward()
    torch.testing.assert_close(out, t["output"], **tol["output"])
    torch.testing.assert_close(x.grad, t["grad_input"], **tol["grad_input"])
    for name, p in layer.named_parameters():  # zero where autograd gives none (the notebook's unused rows)
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), t[f"grad_{name}"],
                                   **tol["grad_params"])


@pytest.mark.parametrize("case", _cases("sasa", "seed_rsa_"))
def test_notebook_module_fixtures_with_compat_defaults(case):
    from zoo.compat.sasa_notebook import RelativeSelfAttention

    meta, t = load_case("sasa", case)
    _assert_sasa_case(RelativeSelfAttention(**meta["ctor"]).double(), t, meta["tolerance"]["float64"])


def test_notebook_example_and_defaults():
    from zoo.compat.sasa_notebook import RelativeSelfAttention
    from zoo.layers import sasa

    ns = _run_original_code("""
        attn = RelativeSelfAttention(64, 128, 7, 8)
        out = attn(torch.randn(2, 64, 14, 14))
    """, torch=torch, RelativeSelfAttention=RelativeSelfAttention)
    assert ns["out"].shape == (2, 128, 14, 14) and ns["attn"].bug_compatible
    out, fixed = ns["attn"], sasa.RelativeSelfAttention(64, 128, 7, 8)
    fixed.load_state_dict(out.state_dict())
    x = torch.randn(1, 64, 9, 9)
    with torch.no_grad():
        assert not torch.allclose(out(x), fixed(x))  # zoo.layers keeps the corrected default


# ------------------------------------------------------------------------------------------- leaderj1001

@pytest.mark.parametrize("case", ["leader_attconv_k3_g4", "leader_attconv_k7_g8", "leader_attstem_k4_m4"])
def test_leaderj1001_layer_fixtures_with_compat_defaults(case):
    from zoo.compat.leaderj1001 import AttentionConv, AttentionStem

    meta, t = load_case("sasa", case)
    layer = (AttentionStem if "attstem" in case else AttentionConv)(**meta["ctor"]).double()
    _assert_sasa_case(layer, t, meta["tolerance"]["float64"])


def test_leaderj1001_bottleneck_fixture():
    from zoo.compat.leaderj1001 import Bottleneck

    meta, t = load_case("sasa", "leader_bottleneck_s2")
    block = Bottleneck(**meta["ctor"]).eval()  # the original's arguments, groups and base_width included
    _assert_sasa_case(block, t, meta["tolerance"]["float32"])


def test_leaderj1001_resnets_have_the_originals_layout_and_load_a_main_py_checkpoint():
    import json

    from zoo import detect
    from zoo.compat import leaderj1001

    layouts = json.loads((fixture_dir("sasa") / "leader_resnet_state_dict_keys.json").read_text())["models"]
    for variant, layout in layouts.items():
        depth, classes, stem = variant.split("_")
        with detect._no_init(), torch.device("meta"):  # shapes only, as zoo.detect builds signatures
            model = getattr(leaderj1001, depth)(num_classes=int(classes[len("classes"):]), stem=stem == "stemTrue")
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout["state_dict"], variant
        assert sum(p.numel() for p in model.parameters()) == layout["num_params"], variant
    # main.py: model = ResNet26(num_classes=num_classes, stem=args.stem); model.load_state_dict(checkpoint['state_dict'])
    model = leaderj1001.ResNet26(num_classes=10, stem=False)
    checkpoint = {"epoch": 1, "arch": "ResNet26", "state_dict": model.state_dict(), "best_acc": 0.0}
    ns = _run_original_code("""
        model = ResNet26(num_classes=10, stem=False)
        model.load_state_dict(checkpoint['state_dict'])
        model.eval()
        with torch.no_grad():
            output = model(torch.randn(2, 3, 32, 32))
    """, torch=torch, ResNet26=leaderj1001.ResNet26, checkpoint=checkpoint)
    assert ns["output"].shape == (2, 10) and ns["model"].bug_compatible
    with pytest.raises(ValueError, match="32x32"):  # the original's fixed 4x4 pool
        ns["model"](torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------ rga, rsa

@pytest.mark.parametrize("case", ["rga_s_stage3", "rga_c_stage3", "rga_sc_stage3"])
def test_rga_module_fixtures(case):
    from zoo.compat.rga import RGA_Module

    meta, t = load_case("rga", case)
    c = {k: v for k, v in meta["constructor"].items() if k != "class"}
    # rga_branches.py builds it as RGA_Module(C, N, use_spatial=..., use_channel=..., cha_ratio=..., spa_ratio=..., down_ratio=...)
    module = RGA_Module(c["in_channel"], c["in_spatial"], use_spatial=c["use_spatial"], use_channel=c["use_channel"],
                        cha_ratio=c["cha_ratio"], spa_ratio=c["spa_ratio"], down_ratio=c["down_ratio"])
    missing, unexpected = module.load_state_dict(_state(t), strict=False)  # torch 0.4: no num_batches_tracked
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(t["input"]), t["output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["rsa_l2ch_V_V", "rsa_R_VplusR_stride2", "rsa_l3_VplusR_VplusR"])
def test_rsa_layer_fixtures(case):
    from zoo.compat.rsa import RSA

    meta, t = load_case("rsa", case)
    layer = RSA(**meta["constructor_args"])
    layer.load_state_dict({k: v.float() for k, v in _state(t).items()})
    with torch.no_grad():
        out = layer(t["input"].float())
    torch.testing.assert_close(out, t["output"], rtol=1e-4, atol=meta["tolerance"]["output"]["atol"])


def test_rsa_as_the_original_resnet_builds_it():
    from zoo.compat.rsa import RSA

    planes = 16
    ns = _run_original_code("""
        conv2 = RSA(d_in=planes, d_out=planes, nh=8, dk=0, dv=0, dd=0, kernel_size=(5, 7, 7), stride=(1, 1, 1),
                    kernel_type='VplusR', feat_type='VplusR')
    """, RSA=RSA, planes=planes)
    layer = ns["conv2"]
    assert (layer.dk, layer.dv, layer.dd) == (2, 2, 2)
    assert [k for k in layer.state_dict()] == ["P1", "I", "projection.weight", "H1.weight", "H2.weight", "G.weight"]
    with torch.no_grad():
        assert layer(torch.randn(1, planes, 5, 6, 6)).shape == (1, planes, 5, 6, 6)
