"""``zoo export NAME --format {hf,onnx,exported-program} --out DIR``: a model for the Hub, ONNX runtimes or torch.export.

Formats (:data:`FORMATS`):

``hf`` (default)
    a folder ready for the Hugging Face Hub, written by :func:`zoo.save_pretrained`: the layout ``zoo convert``
    writes (model.safetensors, config.json, README.md model card), so the folder loads with
    ``zoo.from_pretrained(DIR)`` or, once uploaded (``--push ORG/NAME``), ``zoo.from_pretrained('hf://ORG/NAME')``.
``onnx``
    ``model.onnx`` from the dynamo exporter (:func:`to_onnx`, opset :data:`OPSET`) with the native ops
    translated to standard ONNX ops (:mod:`zoo.ops.onnx`), and ``export.json``: inputs, outputs, preprocessing,
    labels and the onnxruntime check against eager PyTorch (when onnxruntime is installed).
``exported-program``
    ``model.pt2`` (``torch.export.save`` of :func:`to_exported_program`) and the same ``export.json``.

What is exported is :class:`ExportedGraph`: the model in eval mode as a function of one input tensor
(``images`` (B, C, H, W), or ``video`` (B, 3T, H, W) for RSANet) returning a tuple of named tensors:
``logits`` (classification), ``features`` (re-identification), ``pred_logits`` and ``pred_boxes`` (DETR),
and whatever a model's ``forward_export`` returns (the hand-raising detector: fixed-size ``boxes``,
``scores``, ``labels`` and ``num_detections``). The input size is fixed at export (the model's
preprocessing size, or ``input_size``); ``dynamic_batch`` makes the batch dimension symbolic. Custom
ops stay custom ops in eager mode; the exported program holds them as ``relzoo::*`` calls when the native
build is in use, and their reference formulation under ``RELZOO_OPS=reference``.

Needs the ``export`` extra for ONNX (``pip install 'relzoo[export]'``: onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from zoo._fs import atomic_write_text, replace_dir
from zoo.config import KWARG_LIMITS
from zoo.data.config import TASK_KINDS, resolve_data_config
from zoo.errors import ConfigError, DependencyError
from zoo.factory import create_model
from zoo.hub import push_to_hub, save_pretrained
from zoo.ops.onnx import translation_table
from zoo.registry import model_info, split_name

__all__ = ["FORMATS", "OPSET", "ExportedGraph", "example_input", "to_exported_program", "to_onnx", "check_onnx",
           "export_model"]

FORMATS = ("hf", "onnx", "exported-program")
OPSET = 18
#: Largest batch the exported graph accepts with ``dynamic_batch`` (torch.export needs a bound).
MAX_BATCH = 1024
_OUTPUT_OF_TASK = {"classification": "logits", "video": "logits", "reid": "features", "detection": "outputs"}


def _task_kind(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    return TASK_KINDS.get(cfg.task if cfg is not None else "", "classification")


class ExportedGraph(nn.Module):
    """``model`` as what is exported: one input tensor in, a tuple of tensors out (:attr:`output_names`).

    A model's own ``forward_export(x) -> dict of tensors`` is used where it has one (a detector whose
    eager output is a list of variable-length dicts); otherwise ``forward``: a tensor is named after the
    task (``logits``, ``features``), a dict keeps its tensor entries (DETR: ``pred_logits``, ``pred_boxes``;
    the auxiliary decoder outputs, a list, are training outputs and left out).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_name = "video" if _task_kind(model) == "video" else "images"
        self.output_names: tuple[str, ...] = ()

    def _named(self, out) -> "OrderedDict[str, torch.Tensor]":
        if isinstance(out, torch.Tensor):
            return OrderedDict([(_OUTPUT_OF_TASK[_task_kind(self.model)], out)])
        if isinstance(out, dict):
            return OrderedDict((k, v) for k, v in out.items() if isinstance(v, torch.Tensor))
        raise ConfigError(f"{type(self.model).__name__} returns {type(out).__name__}: exporting needs a tensor, a "
                          f"dict of tensors or a forward_export method")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fn = getattr(self.model, "forward_export", None) or self.model
        named = self._named(fn(x))
        self.output_names = tuple(named)
        return tuple(named.values())


def example_input(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch: int = 2) -> torch.Tensor:
    """A random (batch, C, H, W) input of the size the model's preprocessing makes (video: (batch, 3T, H, W)).

    ``input_size``: (H, W) or (C, H, W) instead; detectors, which take any size, default to a square of
    their ``resize_shorter``. Images are standard normal (normalised inputs); the hand-raising detector,
    which normalises inside, takes [0, 1] images.
    """
    config = resolve_data_config(model=model)
    kind = TASK_KINDS[config["task"]]
    channels = model.pretrained_cfg.in_chans * (config["num_frames"] if kind == "video" else 1)
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        if len(size) not in (2, 3):
            raise ConfigError(f"input_size must be (H, W) or (C, H, W), got {list(input_size)}")
        channels, size = (size[0], size[1:]) if len(size) == 3 else (channels, size)
        # the bounds of a model's own size kwargs (zoo.config): past them tracing would only run out of memory
        for what, value, limit in [("channels", channels, KWARG_LIMITS["in_chans"]),
                                   *((side, v, KWARG_LIMITS[side]) for side, v in zip(("height", "width"), size))]:
            if not 1 <= value <= limit:
                raise ConfigError(f"input_size: {what} must be in [1, {limit}], got {value}")
    elif "input_size" in config:
        size = tuple(config["input_size"][-2:])
    else:
        size = (config["resize_shorter"],) * 2
    generator = torch.Generator().manual_seed(0)
    if hasattr(model, "forward_export"):
        return torch.rand(batch, channels, *size, generator=generator)
    return torch.randn(batch, channels, *size, generator=generator)


def _prepare(model: nn.Module, example: Optional[torch.Tensor], input_size, dynamic_batch: bool):
    """(graph, example, dynamic_shapes): the model in eval mode, an example (batch 2 with a dynamic batch: torch
    specialises sizes 0 and 1), run once eagerly (its cached index tables become constants of the graph)."""
    graph = ExportedGraph(model.eval())
    if example is None:
        example = example_input(model, input_size, batch=2 if dynamic_batch else 1)
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        graph(example)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    return graph, example, dynamic_shapes


def to_exported_program(model: nn.Module, example: Optional[torch.Tensor] = None, *,
                        input_size: Optional[Sequence[int]] = None,
                        dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) of :class:`ExportedGraph` (model in eval mode) on ``example`` (default
    :func:`example_input`); ``dynamic_batch``: the batch dimension symbolic (1 to :data:`MAX_BATCH`). The model
    runs once eagerly on the example first: the layers build their relative-position index tables on the first
    call at a size, and the program holds them as constants (tracing their construction would be data-dependent).

    The program's outputs are the tuple of :attr:`ExportedGraph.output_names` (stored in its
    ``graph_module.meta['output_names']`` too)."""
    graph, example, dynamic_shapes = _prepare(model, example, input_size, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    program.graph_module.meta["output_names"] = graph.output_names
    program.graph_module.meta["input_name"] = graph.input_name
    return program


def to_onnx(model: Union[nn.Module, torch.export.ExportedProgram], example: Optional[torch.Tensor] = None, *,
            input_size: Optional[Sequence[int]] = None, dynamic_batch: bool = False,
            opset: int = OPSET) -> "torch.onnx.ONNXProgram":
    """The dynamo ONNX exporter on :func:`to_exported_program`'s program (or on ``model`` itself when it is
    one), the native ops translated by :mod:`zoo.ops.onnx`; returns the ``torch.onnx.ONNXProgram``
    (``.save(path)``, ``.model_proto``). Input and output names are :class:`ExportedGraph`'s; a dynamic
    batch is the symbolic axis ``batch``."""
    if opset < OPSET:
        raise ConfigError(f"ONNX export needs opset >= {OPSET} (the dynamo exporter's translations), got {opset}")
    table = translation_table()  # first: a missing export extra is a DependencyError before any tracing
    program = model if isinstance(model, torch.export.ExportedProgram) else \
        to_exported_program(model, example, input_size=input_size, dynamic_batch=dynamic_batch)
    meta = program.graph_module.meta
    # onnxscript's optimizer warns once per Split node it leaves unfolded: normal, and noise on every export
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        return torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[meta["input_name"]],
                                 output_names=list(meta["output_names"]), custom_translation_table=table,
                                 optimize=True, verbose=False)
    finally:
        folding_log.setLevel(level)


def check_onnx(onnx_path: Union[str, Path], model: nn.Module, inputs: torch.Tensor) -> dict:
    """Run ``model.onnx`` with onnxruntime on ``inputs`` and compare with eager PyTorch (:class:`ExportedGraph`):
    ``{'runtime', 'max_abs_diff' (per output name), 'outputs' (onnxruntime's, numpy arrays)}``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise DependencyError("checking an ONNX file needs onnxruntime: pip install 'relzoo[export]'") from exc
    graph = ExportedGraph(model.eval())
    with torch.no_grad():
        expected = graph(inputs)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    diffs = {}
    for name, want, have in zip(graph.output_names, expected, got):
        want = want.numpy()
        if want.shape != have.shape:
            raise ConfigError(f"onnxruntime output '{name}' has shape {have.shape}, PyTorch {want.shape}")
        diffs[name] = float(abs(want.astype("float64") - have.astype("float64")).max()) if want.size else 0.0
    return {"runtime": f"onnxruntime {onnxruntime.__version__}", "max_abs_diff": diffs, "outputs": got}


def _describe(name: str, model: nn.Module, graph_io: dict, example: torch.Tensor, fmt: str, file: str,
              dynamic_batch: bool, check: Optional[dict]) -> dict:
    """export.json: what the file is, its inputs and outputs, the preprocessing its inputs need."""
    cfg = model.pretrained_cfg
    batch = "batch" if dynamic_batch else int(example.shape[0])
    preprocessing = {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolve_data_config(model=model).items()}
    info = {
        "model": name, "weights": cfg.tag or cfg.source, "format": fmt, "file": file,
        "torch": torch.__version__,
        "inputs": [{"name": graph_io["input_name"], "shape": [batch, *example.shape[1:]], "dtype": "float32"}],
        "outputs": [{"name": n, "shape": [batch if i == 0 else s for i, s in enumerate(shape)], "dtype": dtype}
                    for n, shape, dtype in graph_io["outputs"]],
        "dynamic": {"batch": dynamic_batch, "image_size": False},
        "fixed_size": list(example.shape[2:]),
        "preprocessing": preprocessing,
        "labels": list(cfg.label_names) if cfg.label_names else None,
    }
    if hasattr(model, "forward_export"):
        info["note"] = " ".join((model.forward_export.__doc__ or "").split("\n\n")[1].split())
    elif _task_kind(model) == "detection":
        info["note"] = ("One image size, fixed_size (iRPE's relative-position buckets are made for the encoder's "
                        "feature grid, so the size cannot be symbolic): resize images to it; the graph has no "
                        "padding mask, every pixel is image.")
    if fmt == "onnx":
        info["opset"] = OPSET
    if check is not None:
        info["check"] = {"runtime": check["runtime"], "input": "random (export example)",
                         "max_abs_diff": check["max_abs_diff"]}
    return info


def export_model(name: str, out_dir: Union[str, Path], weights: Optional[str] = None, *, format: str = "hf",
                 input_size: Optional[Sequence[int]] = None, dynamic_batch: bool = False,
                 repo_id: Optional[str] = None, eval_results: Union[str, Path, None] = None, push: bool = False,
                 **overrides) -> Path:
    """Build ``name`` (``name.tag`` loads that tag's weights; random weights when the model has none) and write
    it to ``out_dir`` in ``format`` (:data:`FORMATS`); returns the folder.

    ``hf``: :func:`zoo.save_pretrained` (``repo_id``: the Hub repo it is for; ``eval_results``: a ``zoo eval --out``
    file for the card; ``push``: also upload it to ``repo_id`` with :func:`zoo.push_to_hub`).
    ``onnx`` / ``exported-program``: ``model.onnx`` / ``model.pt2`` and ``export.json``, written to a temporary
    folder and moved into place whole (an existing ``out_dir`` is replaced); ``input_size`` (H, W) or (C, H, W)
    and ``dynamic_batch`` as :func:`to_onnx`.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    base, tag = split_name(name)
    cfg = model_info(base)
    if push and not repo_id:
        raise ConfigError("push needs a repo_id (org/name) to upload to")
    if format != "hf" and (push or repo_id or eval_results):
        raise ConfigError("--repo-id, --push and --eval-results are for --format hf")
    pretrained = weights is None and (tag is not None or cfg.default_weights is not None)
    model = create_model(name, pretrained=pretrained, weights=weights, **overrides)
    if format == "hf":
        folder = save_pretrained(model, out_dir, repo_id=repo_id, eval_results=eval_results)
        if push:
            push_to_hub(model, repo_id, eval_results=eval_results)
        return folder
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    example = example_input(model, input_size, batch=2 if dynamic_batch else 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        check = None
        program = to_exported_program(model, example, dynamic_batch=dynamic_batch)
        if format == "onnx":
            file = "model.onnx"
            to_onnx(program).save(str(tmp / file))
            try:
                check = check_onnx(tmp / file, model, example)
            except DependencyError:  # onnxruntime is not installed: export.json says nothing was checked
                pass
        else:
            file = "model.pt2"
            torch.export.save(program, str(tmp / file))
        # the outputs' shapes and dtypes as traced (a symbolic batch a SymInt): no further eager run for them
        meta = program.graph_module.meta
        traced = [node.meta["val"] for node in program.graph.output_node().args[0]]
        graph_io = {"input_name": meta["input_name"],
                    "outputs": [(n, [d if isinstance(d, int) else str(d) for d in o.shape],
                                 str(o.dtype).replace("torch.", "")) for n, o in zip(meta["output_names"], traced)]}
        info = _describe(name, model, graph_io, example, format, file, dynamic_batch, check)
        atomic_write_text(tmp / "export.json", json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
