"""Deploy anywhere (issue 16): torch.export, ONNX with onnxruntime parity, torch.compile, half precision.

Every RelZoo-mini (fast, in CI) and one full-size model per family (``slow``, small inputs) goes through
:func:`deploy_checks`:

- ``torch.export`` with a dynamic batch (:func:`zoo.export.to_exported_program`): the program's outputs
  equal eager PyTorch's (1e-4) on a random batch of 3 and on a real sample of the model's synthetic dataset;
- ONNX (dynamo exporter, the native ops translated by :mod:`zoo.ops.onnx`): onnxruntime's outputs match
  eager PyTorch within 1e-4 max abs on a random input (batch 1 and 3: the batch is dynamic) and on the
  real sample;
- ``torch.compile`` (full graph, ``aot_eager`` backend: dynamo and AOTAutograd tracing with the ops' fake
  kernels; inductor's code generation takes minutes per model here, so its compile times and parity are
  measured by ``benchmarks/compile.py``): no graph break, the eager outputs (1e-4);
- ``torch.autocast("cpu", dtype=torch.bfloat16)``: cosine similarity >= 0.999 to the float32 outputs
  (the detector: of its feature pyramid, since thresholded detections move under reduced precision);
  ``model.to(torch.bfloat16)`` runs; ``channels_last`` (``channels_last_3d`` for the 3-D RSANet) gives
  the same outputs.

``pytest tests/test_export.py --export-table docs/export_support.json`` also writes what passed, the
rows of README's generated export table (``scripts/model_table.py``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import demo
from zoo.eval.protocol import get_protocol
from zoo.export import ExportedGraph, check_onnx, example_input, to_exported_program, to_onnx
from zoo.registry import model_info

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ATOL = 1e-4
COSINE = 0.999


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tracing is Python; the machine is shared


@pytest.fixture(scope="module")
def export_rows(request):
    """``record(name, row)``: the row of the export table, written with ``--export-table PATH``."""
    path = request.config.getoption("--export-table")

    def record(name: str, row: dict) -> None:
        if not path:
            return
        table = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        table[name] = row
        Path(path).write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")

    return record


def real_sample(name: str, data_dir: Path) -> torch.Tensor:
    """The first sample of the model's evaluation protocol on a synthetic dataset: (1, C, H, W)."""
    cfg = model_info(name)
    options = dict(cfg.eval)
    protocol = get_protocol(options.pop("protocol"))(data_dir, cfg, options, limit=2)  # re-id: query + gallery
    item = protocol.dataset()[0][0]
    if protocol.name == "ssv":  # (clips, 3T, H, W): the first clip
        item = item[0]
    return item[None]


def _close(expected, got, what: str) -> float:
    worst = 0.0
    for e, g in zip(expected, got):
        assert e.shape == g.shape, f"{what}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        if not e.is_floating_point():
            assert torch.equal(e, g), f"{what}: integer outputs differ"
            continue
        worst = max(worst, float((e.double() - g.double()).abs().max()) if e.numel() else 0.0)
    assert worst <= ATOL, f"{what}: max abs difference {worst:.3g} > {ATOL}"
    return worst


def _cosine(expected, got) -> float:
    return min(float(F.cosine_similarity(e.double().flatten(), g.double().flatten(), dim=0))
               for e, g in zip(expected, got) if e.is_floating_point())


def _dense(model, x):
    """The outputs reduced precision is compared on: the detector's feature pyramid, else the model's outputs."""
    if hasattr(model, "forward_export"):
        return tuple(model.backbone(model.transform.normalize(x)).values())
    return ExportedGraph(model)(x)


def deploy_checks(name: str, sample: torch.Tensor, tmp_path: Path, pretrained: bool, **model_kwargs) -> dict:
    """Every deploy check of the module docstring on ``name`` (its default weights, or random ones); returns
    the export table's row.

    A detector with random weights scores its candidates almost alike: which of the near-tied boxes rank and
    survive NMS then follows float rounding, which differs between onnxruntime's kernels and PyTorch's. Its
    onnxruntime outputs are checked for shape and range only, and its channels_last run on the feature pyramid;
    box, score and label parity is the trained mini's (torch.export / torch.compile run PyTorch's kernels:
    exact there too)."""
    model = zoo.create_model(name, pretrained=pretrained, **model_kwargs).eval()
    graph = ExportedGraph(model)
    size = tuple(sample.shape[1:])
    randoms = [example_input(model, size, batch=3), example_input(model, size, batch=1)]
    with torch.no_grad():
        expected = [graph(x) for x in [*randoms, sample]]
    row = {"weights": model_info(name).default_weights if pretrained else "random", "input": list(size)}

    # torch.export, dynamic batch
    program = to_exported_program(model, example_input(model, size, batch=2), dynamic_batch=True)
    with torch.no_grad():
        for x, want in zip([randoms[0], sample], [expected[0], expected[2]]):
            _close(want, program.module()(x), f"{name} torch.export")
    row["torch.export"] = "dynamic batch"

    # ONNX + onnxruntime
    onnx_path = tmp_path / "model.onnx"
    to_onnx(program).save(str(onnx_path))
    worst = 0.0
    ill_conditioned = hasattr(model, "forward_export") and not pretrained
    for x, want in zip([*randoms, sample], expected):
        got = [torch.from_numpy(o) for o in check_onnx(onnx_path, model, x)["outputs"]]
        if ill_conditioned:
            assert [g.shape for g in got] == [w.shape for w in want]
            assert ((got[-1] >= 0) & (got[-1] <= got[1].shape[1])).all()
            continue
        worst = max(worst, _close(want, got, f"{name} onnxruntime (batch {x.shape[0]})"))
    row["onnx"] = {"opset": 18, "dynamic_batch": True, "fixed_size": list(size[-2:]),
                   "max_abs_diff": None if ill_conditioned else worst}

    # torch.compile: no graph break, eager outputs
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # NMS: its output size is the data's
        compiled = torch.compile(graph, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            _close(expected[2], compiled(sample), f"{name} torch.compile")
    torch._dynamo.reset()
    row["torch.compile"] = "full graph"

    # half precision
    with torch.no_grad():
        dense = _dense(model, sample)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cosine = _cosine(dense, _dense(model, sample))
            graph(sample)
        assert cosine >= COSINE, f"{name} bf16 autocast: cosine {cosine:.5f} < {COSINE}"
        half = copy.deepcopy(model).to(torch.bfloat16)
        low = _dense(half, sample.to(torch.bfloat16))
        assert all(t.dtype == torch.bfloat16 for t in low if t.is_floating_point())
        assert _cosine(dense, low) >= 0.99, f"{name} .to(bfloat16): cosine {_cosine(dense, low):.4f}"
        ExportedGraph(half)(sample.to(torch.bfloat16))
        if hasattr(model, "forward_export"):  # the detector's eager forward too (torchvision's NMS in float32)
            assert all(d["boxes"].dtype == torch.bfloat16 for d in half(list(sample.to(torch.bfloat16))))
    row["bf16_autocast_cosine"] = cosine

    # memory formats: channels_last for 2-D models, channels_last_3d for the 3-D RSANet
    three_d = any(p.dim() == 5 for p in model.parameters())
    layout = torch.channels_last_3d if three_d else torch.channels_last
    with torch.no_grad():
        moved = copy.deepcopy(model).to(memory_format=layout)
        x = sample if three_d else sample.to(memory_format=torch.channels_last)
        if ill_conditioned:  # the layout's rounding reorders near-tied detections too: compare the pyramid
            assert _cosine(_dense(model, sample), _dense(moved, x)) >= 0.99999, f"{name} {layout}"
        else:
            _close(expected[2], ExportedGraph(moved)(x), f"{name} {layout}")
    row["memory_format"] = str(layout).replace("torch.", "")
    return row


@pytest.mark.parametrize("mini", demo.MINIS, ids=[m.name for m in demo.MINIS])
def test_mini_deploys(mini, tiny_dataset, tmp_path, export_rows):
    sample = real_sample(mini.name, tiny_dataset(mini.kind, "val"))
    export_rows(mini.name, deploy_checks(mini.name, sample, tmp_path, pretrained=True))


#: One full-size model per family (random weights), with the smallest input its architecture takes.
FULL_SIZE = {
    "deit_tiny_patch16_224_ctx_product_50_shared_k": ((3, 224, 224), {}),
    "rga_sc_resnet50": ((3, 256, 128), {}),
    "rsanet_r50": ((24, 64, 64), {"num_segments": 8}),
    "sasa_resnet26": ((3, 64, 64), {}),
    "handraise_rcnn_r50_fpn_rpa_position": ((3, 192, 256), {"min_size": 192, "max_size": 256}),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_deploys(name, tmp_path, export_rows):
    size, kwargs = FULL_SIZE[name]
    torch.manual_seed(0)
    sample = torch.randn(1, *size) if not name.startswith("handraise") else torch.rand(1, *size)
    export_rows(name, deploy_checks(name, sample, tmp_path, pretrained=False, **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA float16 autocast needs a GPU")
@pytest.mark.parametrize("mini", demo.MINIS, ids=[m.name for m in demo.MINIS])
def test_mini_cuda_float16_autocast(mini):
    model = zoo.create_model(mini.name, pretrained=True).eval().cuda()
    x = example_input(model, batch=2).cuda()
    with torch.no_grad():
        dense = _dense(model, x)
        with torch.autocast("cuda", dtype=torch.float16):
            half = _dense(model, x)
            ExportedGraph(model)(x)
    assert _cosine(dense, half) >= COSINE


# ---------------------------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_cli_writes_onnx_and_exported_program(tmp_path):
    """``zoo export --format onnx|exported-program``: the files, export.json, and outputs that match eager."""
    from zoo.cli import main

    assert main(["export", "rpa_cifar_toy", "--format", "onnx", "--out", str(tmp_path / "onnx"), "--dynamic-batch",
                 "--quiet"]) == 0
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["export.json", "model.onnx"]
    assert info["format"] == "onnx" and info["opset"] == 18 and info["file"] == "model.onnx"
    assert info["inputs"] == [{"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert info["preprocessing"]["input_size"] == [3, 32, 32] and info["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert 0 <= info["check"]["max_abs_diff"]["logits"] <= ATOL

    assert main(["export", "rpa_cifar_toy", "--format", "exported-program", "--out", str(tmp_path / "pt2"),
                 "--input-size", "3", "48", "40", "--quiet"]) == 0
    info = json.loads((tmp_path / "pt2" / "export.json").read_text())
    assert info["format"] == "exported-program" and info["inputs"][0]["shape"] == [1, 3, 48, 40]
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2"))
    (logits,) = program.module()(torch.rand(1, 3, 48, 40))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_cli_export_rejects_bad_arguments(tmp_path, capsys):
    from zoo.cli import main

    assert main(["export", "rpa_cifar_toy", "--format", "onnx", "--out", str(tmp_path / "o"), "--push", "a/b"]) == 2
    assert "--format hf" in capsys.readouterr().err
    assert main(["export", "rpa_cifar_toy", "--format", "onnx", "--out", str(tmp_path / "o"),
                 "--input-size", "1", "2", "3", "4"]) == 2
    assert "input_size" in capsys.readouterr().err
    for size, named in [(["0", "32"], "height must be in [1, 8192], got 0"),
                        (["32", "100000"], "width must be in [1, 8192], got 100000"),
                        (["-3", "32", "32"], "channels must be in [1, 1024], got -3")]:
        assert main(["export", "rpa_cifar_toy", "--format", "onnx", "--out", str(tmp_path / "o"),
                     "--input-size", *size]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_forward_export_checks_its_batch():
    model = zoo.create_model("handraise_rpa_mini").eval()
    with pytest.raises(zoo.errors.InputError, match=r"3 input channels"):
        model.forward_export(torch.rand(1, 4, 64, 64))
    with pytest.raises(zoo.errors.InputError, match=r"shape \(B, 3, H, W\)"):
        model.forward_export(torch.rand(3, 64, 64))


@pytest.mark.slow
def test_export_without_the_native_build(tmp_path, monkeypatch):
    """RELZOO_OPS=reference: every layer's reference formulation is exported (no relzoo op in the program)
    and onnxruntime matches eager PyTorch."""
    monkeypatch.setenv("RELZOO_OPS", "reference")
    torch.manual_seed(0)
    model = zoo.create_model("rpa_cifar_toy").eval()
    program = to_exported_program(model, dynamic_batch=True)
    assert "relzoo" not in str(program.graph)
    to_onnx(program).save(str(tmp_path / "model.onnx"))
    check = check_onnx(tmp_path / "model.onnx", model, example_input(model, batch=3))
    assert check["max_abs_diff"]["logits"] <= ATOL


@pytest.mark.slow
def test_reference_neighborhood_attention_exports():
    """The SASA op's reference formulation (what RELZOO_OPS=reference exports) traces without data-dependent
    branches, windows wholly outside the key grid included, and onnxruntime gives its values."""
    import onnxruntime

    from zoo.ops.neighborhood_attn import neighborhood_attention

    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            return neighborhood_attention(q, k, v, kernel_size=2, offset=(3, -5), backend="reference")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 4, 3, generator=gen) for _ in range(3))
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.onnx.export(Window(), (q, k, v), dynamo=True, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    q, k, v = (t[:1] for t in (q, k, v))
    (got,) = session.run(None, dict(zip([i.name for i in session.get_inputs()], (q.numpy(), k.numpy(), v.numpy()))))
    _close((Window()(q, k, v),), (torch.from_numpy(got),), "reference neighbourhood attention")
