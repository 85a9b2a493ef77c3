"""Typed model configs, read from ``configs/<family>.yaml``.

One YAML per family holds, for each registered model: its task, the constructor
kwargs, the preprocessing (:class:`Preprocessing`), the evaluation protocol, the weights
entries (by tag) and the reported metrics with their source. A malformed file is a
:class:`~zoo.errors.ConfigError` naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from zoo.errors import ConfigError, WeightsError
from zoo.paths import configs_dir


@dataclass(frozen=True)
class WeightsEntry:
    """Where one set of weights comes from.

    ``source`` is ``hf://org/repo[@rev]/file``, an https URL or a path (relative paths
    are relative to the data root). ``sha256`` None means unknown: the first download
    records and reports it. ``converter`` names a ``convert/<name>.yaml`` map when the
    file is an original checkpoint rather than our safetensors.

    ``label_names``: what each output class of these weights means, by class id: a list of
    names, or the name of a dataset's label set (``"coco"``, ``"shapes-det"``; resolved by
    :func:`zoo.data.labels.label_names`); None for weights without classes (re-id embeddings).
    ``license``: of these weights (a Hugging Face license id, e.g. ``mit``); None: the family's.
    """

    tag: str
    source: str
    sha256: Optional[str] = None
    converter: Optional[str] = None
    note: str = ""
    label_names: Optional[Union[str, tuple[str, ...]]] = None
    license: Optional[str] = None


@dataclass(frozen=True)
class ReportedMetric:
    """One number a paper or release reports, in the units of its table (AP 42.2, top-1 81.2).

    ``weights`` is the tag of the checkpoint it belongs to, or None for a paper number
    without released weights. ``verified`` False marks values the spec could not confirm.
    ``split`` and ``num_samples`` say what it was measured on (the split's name as the evaluation
    protocol names it, e.g. ``val2017``, and the number of samples evaluated), when known; a model
    config's ``measured_on`` states them once per dataset.
    """

    metric: str
    value: float
    dataset: str
    source: str
    weights: Optional[str] = None
    verified: bool = True
    note: str = ""
    split: Optional[str] = None
    num_samples: Optional[int] = None


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True, repr=False)
class Preprocessing(Mapping):
    """How an image (or a video's frames) becomes the model's input, as the model's config states it.

    Field names follow timm's pretrained configs where they exist. A field left None is not
    stated: the transform that needs it uses its own default (:mod:`zoo.data.transforms`, which
    also holds the ImageNet mean and std). Sizes are (height, width) in pixels.

    As a read-only mapping it holds the stated fields only, so ``dict(pre)`` is what the config
    says (JSON-ready) and ``Preprocessing.parse({**pre, "max_size": 96}, where)`` overrides a field.
    """

    input_size: Optional[tuple[int, int]] = None  # the network's input; for video the crop of each frame
    resize: Optional[tuple[int, int]] = None  # video: every frame resized to exactly this before the crop
    resize_shorter: Optional[int] = None  # detection (DETR): the shorter side becomes this ...
    max_size: Optional[int] = None  # ... unless the longer side would then exceed this
    crop_pct: Optional[float] = None  # classification: resize to input_size / crop_pct, then centre crop
    mean: Optional[tuple[float, float, float]] = None  # per RGB channel, of pixels scaled to [0, 1]
    std: Optional[tuple[float, float, float]] = None
    interpolation: Optional[str] = None  # one of INTERPOLATIONS
    num_frames: Optional[int] = None  # video: frames sampled per clip (T)
    layout: Optional[str] = None  # the input tensor's layout in words, for readers (e.g. "B,3T,H,W")

    @classmethod
    def parse(cls, raw: Any, where: str) -> Preprocessing:
        """Validate a mapping (a config's ``preprocessing:``, or overrides of it) into a Preprocessing.

        Unknown fields, wrong types and bad values are a ConfigError naming ``where`` and the field.
        """
        if isinstance(raw, Preprocessing):
            return raw
        data = _check_fields(dict(raw) if isinstance(raw, Mapping) else raw, cls, where)
        pre = cls(**{name: _PREPROCESSING_CHECKS[name](value, f"{where}.{name}")
                     for name, value in data.items() if value is not None})
        if pre.resize is not None and pre.input_size is not None and (
                pre.resize[0] < pre.input_size[0] or pre.resize[1] < pre.input_size[1]):
            raise ConfigError(f"{where}.resize: {list(pre.resize)} must be at least input_size "
                              f"{list(pre.input_size)} (the crop is taken from the resized frames)")
        return pre

    def __getitem__(self, name: str):
        value = getattr(self, name) if name in _PREPROCESSING_CHECKS else None
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self):
        return (f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:  # the stated fields only
        return f"Preprocessing({', '.join(f'{name}={value!r}' for name, value in self.items())})"


def _size(value: Any, where: str) -> tuple[int, int]:
    """An int n (n x n) or [height, width] of positive ints -> (height, width)."""
    if _is_int(value) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where}: expected a positive int or [height, width], got {value!r}")


def _positive_int(value: Any, where: str) -> int:
    if not (_is_int(value) and value > 0):
        raise ConfigError(f"{where}: expected a positive int, got {value!r}")
    return int(value)


def _fraction(value: Any, where: str) -> float:
    if not (_is_number(value) and 0 < value <= 1):
        raise ConfigError(f"{where}: expected a number in (0, 1], got {value!r}")
    return float(value)


def _per_channel(value: Any, where: str) -> tuple[float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
        raise ConfigError(f"{where}: expected three numbers [R, G, B], got {value!r}")
    return tuple(float(v) for v in value)


def _positive_per_channel(value: Any, where: str) -> tuple[float, float, float]:
    channels = _per_channel(value, where)
    if not all(v > 0 for v in channels):
        raise ConfigError(f"{where}: expected positive numbers, got {value!r}")
    return channels


def _interpolation(value: Any, where: str) -> str:
    if value not in INTERPOLATIONS:
        raise ConfigError(f"{where}: expected one of {', '.join(INTERPOLATIONS)}, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    return _typed(value, str, where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Preprocessing field -> its check: (value, where) -> the value stored.
_PREPROCESSING_CHECKS = {
    "input_size": _size, "resize": _size, "resize_shorter": _positive_int, "max_size": _positive_int,
    "crop_pct": _fraction, "mean": _per_channel, "std": _positive_per_channel, "interpolation": _interpolation,
    "num_frames": _positive_int, "layout": _text,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the zoo knows about one registered model besides its code."""

    name: str
    family: str
    task: str
    description: str = ""
    kwargs: dict = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    eval: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # tag -> WeightsEntry
    default_weights: Optional[str] = None
    reported: tuple = ()  # ReportedMetric, ...
    notes: str = ""
    measured_on: dict = field(default_factory=dict)  # dataset -> MeasuredSplit of its reported rows
    paper: str = ""  # the family's paper unless the model states its own
    license: Optional[str] = None  # the family's (the original code's and its released weights') unless stated

    def __post_init__(self):
        # a mapping given in code (ModelConfig(..., preprocessing={...}), dataclasses.replace) is validated as YAML is
        where = f"model '{self.name}': preprocessing"
        object.__setattr__(self, "preprocessing", Preprocessing.parse(self.preprocessing, where))

    def weights_entry(self, tag: Optional[str] = None) -> WeightsEntry:
        """The entry for ``tag`` (default: ``default_weights``); a clear error when there is none."""
        tag = tag or self.default_weights
        if tag is None:
            hint = f" Available tags: {', '.join(self.weights)}." if self.weights else ""
            raise WeightsError(f"model '{self.name}' has no default pretrained weights.{hint} {self.notes}".strip())
        if tag not in self.weights:
            raise WeightsError(f"model '{self.name}' has no weights tagged '{tag}'{self.tag_hint(tag)}")
        return self.weights[tag]

    def tag_hint(self, tag: str) -> str:
        """'; did you mean 'x'?' for a mistyped weights tag (else the known tags), for error messages."""
        close = difflib.get_close_matches(tag, list(self.weights), n=3, cutoff=0.6)
        if close:
            return f"; did you mean {' or '.join(repr(t) for t in close)}?"
        return f" (known tags: {', '.join(self.weights) or 'none'})"

    def reported_for(self, tag: Optional[str]) -> list[ReportedMetric]:
        """Reported rows for a weights tag (tag None: the rows of the default tag, else the paper's rows)."""
        tag = tag or self.default_weights
        rows = [r for r in self.reported if r.weights == tag]
        return rows or [r for r in self.reported if r.weights is None]


# --------------------------------------------------------------------------------------------
# Constructor kwargs from files: bounded before anything is built
# --------------------------------------------------------------------------------------------

#: The largest value a checkpoint or a RelZoo folder's ``config.json`` may give each constructor kwarg
#: that sizes a tensor (list values: each element). These are counts and widths a hostile file could
#: otherwise set to ask for terabytes (``num_classes: 1e11``, 10^8 blocks in a stage); kwargs the
#: caller passes in code are not bounded. Every other integer is bounded by :data:`MAX_KWARG_INT`.
KWARG_LIMITS: dict[str, int] = {
    "num_classes": 100_000, "num_queries": 100_000,
    "layers": 256, "backbone_layers": 256, "depth": 256, "enc_layers": 256, "dec_layers": 256,
    "hidden_dim": 16_384, "embed_dim": 16_384, "fpn_channels": 16_384, "hidden_channels": 16_384,
    "dim_feedforward": 65_536, "representation_size": 65_536,
    "nheads": 1024, "num_heads": 1024, "heads": 1024, "nh": 1024, "stem_heads": 1024, "stem_mixtures": 1024,
    "height": 8192, "width": 8192, "img_size": 8192, "min_size": 8192, "max_size": 8192, "patch_size": 8192,
    "kernel_size": 255, "rpa_kernel_size": 255, "num_segments": 1024, "in_chans": 1024, "anchor_sizes": 8192,
    "width_div": 64, "backbone_width_div": 64,
}
MAX_KWARG_INT = 1 << 20      # any other integer, in absolute value
MAX_KWARG_ITEMS = 64         # entries of a list or mapping
MAX_KWARG_TEXT = 1000        # characters of a string
MAX_KWARG_DEPTH = 4          # nesting of lists and mappings


def check_file_kwargs(kwargs: Any, where: str, error: type[Exception] = ConfigError) -> dict:
    """``kwargs`` (constructor kwargs read from a file: a checkpoint, a folder's config.json) as a dict,
    checked before any model is built: JSON-like values only (no NaN/inf), every size of
    :data:`KWARG_LIMITS` an integer in ``[0, limit]``, other integers, lists and strings bounded.

    Raises ``error`` naming ``where``, the key and the bound."""
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise error(f"{where}: constructor kwargs must be a mapping with string keys, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        _check_kwarg(value, key, KWARG_LIMITS.get(key), where, error, depth=0)
    return dict(kwargs)


def _check_kwarg(value: Any, key: str, limit: Optional[int], where: str, error: type[Exception], depth: int) -> None:
    def fail(problem: str) -> Exception:
        return error(f"{where}: kwarg '{key}' {problem}")

    if isinstance(value, bool) or value is None:
        if limit is not None and isinstance(value, bool):
            raise fail(f"is a size: expected an integer in [0, {limit}], got {value!r}")
        return
    if isinstance(value, int):
        if limit is not None and not 0 <= value <= limit:
            raise fail(f"= {value} is outside [0, {limit}], the bound RelZoo puts on it (zoo.config.KWARG_LIMITS)")
        if abs(value) > MAX_KWARG_INT:
            raise fail(f"= {value} exceeds the bound {MAX_KWARG_INT} on integers read from a file")
        return
    if isinstance(value, float):
        if limit is not None:
            raise fail(f"is a size: expected an integer in [0, {limit}], got {value!r}")
        if not math.isfinite(value):
            raise fail(f"= {value!r} is not a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_KWARG_TEXT:
            raise fail(f"is a string of {len(value)} characters (bound {MAX_KWARG_TEXT})")
        return
    if isinstance(value, (list, tuple, Mapping)):
        if depth >= MAX_KWARG_DEPTH:
            raise fail(f"nests lists or mappings deeper than {MAX_KWARG_DEPTH} levels")
        if len(value) > MAX_KWARG_ITEMS:
            raise fail(f"has {len(value)} entries (bound {MAX_KWARG_ITEMS})")
        items = value.values() if isinstance(value, Mapping) else value
        if isinstance(value, Mapping) and not all(isinstance(k, str) for k in value):
            raise fail("is a mapping with non-string keys")
        for item in items:
            _check_kwarg(item, key, limit, where, error, depth + 1)
        return
    raise fail(f"is a {type(value).__name__}; expected a number, string, boolean, null, list or mapping")


@dataclass(frozen=True, repr=False)
class PretrainedCfg(Mapping):
    """What a built model is: ``model.pretrained_cfg`` (and ``model.default_cfg``, the same object).

    Made by :func:`zoo.create_model` from the model's :class:`ModelConfig`, the :class:`WeightsEntry`
    it loaded (tag, source, sha256; None for random initialisation) and the constructor kwargs it
    used. timm's ``PretrainedCfg`` is the model: as a read-only mapping it answers timm's keys
    (``input_size`` as (in_chans, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``num_classes``, ``label_names``, ...), so ``timm.data.resolve_data_config(model=m)`` reads it too;
    :func:`zoo.data.resolve_data_config` is RelZoo's own.

    ``label_names``: the name of each output class by class id (None when unknown, or when
    ``num_classes`` was changed from the weights'). ``model_kwargs``: everything ``create_model``
    needs to build the same network again (constructor kwargs, and ``features_only`` /
    ``out_indices`` for a feature extractor).
    """

    architecture: str
    task: str = ""
    family: str = ""
    tag: Optional[str] = None
    source: Optional[str] = None
    sha256: Optional[str] = None
    num_classes: Optional[int] = None
    label_names: Optional[tuple[str, ...]] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    in_chans: int = 3
    reported: tuple[ReportedMetric, ...] = ()
    license: Optional[str] = None
    paper: str = ""
    model_kwargs: dict = field(default_factory=dict)

    @classmethod
    def build(cls, config: ModelConfig, entry: Optional[WeightsEntry] = None, *,
              model_kwargs: Optional[Mapping] = None, label_names: Optional[Sequence[str]] = None,
              preprocessing: Optional[Mapping] = None) -> PretrainedCfg:
        """The cfg of ``config``'s model built with ``model_kwargs`` (default: the config's kwargs) and the
        weights ``entry`` (None: random initialisation, no weights fields). ``label_names`` are the
        entry's, resolved (a label set's name is resolved by :mod:`zoo.data.labels`, a floor up);
        ``preprocessing`` overrides fields of the config's (e.g. what a weights folder recorded)."""
        kwargs = dict(config.kwargs if model_kwargs is None else model_kwargs)
        num_classes = kwargs.get("num_classes")
        names = tuple(label_names) if label_names is not None else None
        if names is not None and num_classes is not None and len(names) != num_classes:
            names = None  # a new head (num_classes changed): the weights' class names do not apply
        pre = Preprocessing.parse({**config.preprocessing, **(preprocessing or {})}, f"model '{config.name}'")
        weights_fields = {}
        if entry is not None:
            weights_fields = {"tag": entry.tag, "source": entry.source, "sha256": entry.sha256}
        return cls(architecture=config.name, task=config.task, family=config.family, num_classes=num_classes,
                   label_names=names, preprocessing=pre, in_chans=int(kwargs.get("in_chans", 3)),
                   reported=tuple(config.reported_for(entry.tag if entry is not None else None)),
                   license=(entry.license if entry is not None and entry.license else config.license),
                   paper=config.paper, model_kwargs=kwargs, **weights_fields)

    def replace(self, **changes) -> PretrainedCfg:
        """A copy with ``changes`` (e.g. ``label_names=[...]`` after fine-tuning on new classes)."""
        if changes.get("label_names") is not None:
            changes["label_names"] = tuple(changes["label_names"])
        return dataclasses.replace(self, **changes)

    # timm's names of the preprocessing fields
    @property
    def input_size(self) -> Optional[tuple[int, int, int]]:
        """(in_chans, height, width) of the network's input (a video frame's crop), when stated."""
        size = self.preprocessing.input_size
        return None if size is None else (self.in_chans, *size)

    @property
    def mean(self) -> Optional[tuple[float, float, float]]:
        return self.preprocessing.mean

    @property
    def std(self) -> Optional[tuple[float, float, float]]:
        return self.preprocessing.std

    @property
    def interpolation(self) -> Optional[str]:
        return self.preprocessing.interpolation

    @property
    def crop_pct(self) -> Optional[float]:
        return self.preprocessing.crop_pct

    @property
    def num_frames(self) -> Optional[int]:
        return self.preprocessing.num_frames

    def to_dict(self) -> dict[str, Any]:
        """The stated fields as JSON-ready data, flat with timm's key names: every preprocessing field
        at the top (``input_size`` as (in_chans, H, W)), and ``reported`` as one dict a row."""
        out: dict[str, Any] = {"architecture": self.architecture, "task": self.task, "family": self.family,
                               "tag": self.tag, "source": self.source, "sha256": self.sha256,
                               "num_classes": self.num_classes, "in_chans": self.in_chans,
                               "label_names": list(self.label_names) if self.label_names is not None else None,
                               **dict(self.preprocessing), "input_size": self.input_size,
                               "reported": [dataclasses.asdict(r) for r in self.reported],
                               "license": self.license, "paper": self.paper or None,
                               "model_kwargs": dict(self.model_kwargs)}
        return {k: v for k, v in out.items() if v is not None}

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __repr__(self) -> str:
        weights = f"{self.tag}: {self.source}" if self.tag else "random init"
        return (f"PretrainedCfg({self.architecture}, {weights}, num_classes={self.num_classes}, "
                f"{self.preprocessing!r})")


@dataclass(frozen=True)
class MeasuredSplit:
    """What the reported numbers of one dataset were measured on: the split's name as the evaluation
    protocol names it (``val2017``, ``val``) and the number of samples evaluated; None = not known."""

    split: Optional[str] = None
    num_samples: Optional[int] = None


@dataclass(frozen=True)
class FamilyConfig:
    family: str
    title: str
    paper: str = ""
    spec: str = ""
    license: Optional[str] = None  # of the original code and its released weights (a Hugging Face license id)
    models: dict = field(default_factory=dict)  # name -> ModelConfig


def _check_fields(obj: Any, cls, where: str, required: tuple = ()) -> dict:
    """``obj`` must be a mapping whose keys are fields of ``cls``; returns it as a dict."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [name for name in required if name not in obj]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    return dict(obj)


def _typed(value: Any, types, where: str):
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    return value


def _label_names(value: Any, where: str) -> Union[str, tuple[str, ...], None]:
    """A weights entry's ``label_names``: a list of names (by class id) or a label set's name."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of class names or the name of a label set, got {value!r}")


def _measured_on(raw: Any, where: str) -> dict[str, MeasuredSplit]:
    out = {}
    for dataset, split in _typed(raw or {}, dict, where).items():
        data = _check_fields(split, MeasuredSplit, f"{where}.{dataset}")
        if data.get("split") is not None:
            _text(data["split"], f"{where}.{dataset}.split")
        if data.get("num_samples") is not None:
            _positive_int(data["num_samples"], f"{where}.{dataset}.num_samples")
        out[str(dataset)] = MeasuredSplit(**data)
    return out


def _parse_model(name: str, raw: Any, family: FamilyConfig, where: str) -> ModelConfig:
    data = _check_fields(raw, ModelConfig, where, required=("task",))
    data.pop("name", None)
    data.pop("family", None)
    data.setdefault("paper", family.paper)
    data.setdefault("license", family.license)
    data["measured_on"] = _measured_on(data.get("measured_on"), f"{where}.measured_on")
    for key in ("kwargs", "preprocessing", "eval"):
        data[key] = _typed(data.get(key) or {}, dict, f"{where}.{key}")
    data["preprocessing"] = Preprocessing.parse(data["preprocessing"], f"{where}.preprocessing")
    weights = {}
    for tag, entry in (_typed(data.get("weights") or {}, dict, f"{where}.weights")).items():
        w = _check_fields(entry, WeightsEntry, f"{where}.weights.{tag}", required=("source",))
        w.pop("tag", None)
        _typed(w["source"], str, f"{where}.weights.{tag}.source")
        if w.get("sha256") is not None and (len(str(w["sha256"])) != 64):
            raise ConfigError(f"{where}.weights.{tag}.sha256: expected 64 hex digits or null")
        w["label_names"] = _label_names(w.get("label_names"), f"{where}.weights.{tag}.label_names")
        weights[str(tag)] = WeightsEntry(tag=str(tag), **w)
    data["weights"] = weights
    default = data.get("default_weights")
    if default is not None and default not in weights:
        raise ConfigError(f"{where}.default_weights: '{default}' is not one of the weights tags {sorted(weights)}")
    reported = []
    for i, row in enumerate(_typed(data.get("reported") or [], list, f"{where}.reported")):
        r = _check_fields(row, ReportedMetric, f"{where}.reported[{i}]", required=("metric", "value", "dataset", "source"))
        _typed(r["value"], (int, float), f"{where}.reported[{i}].value")
        if r.get("weights") is not None and r["weights"] not in weights:
            raise ConfigError(f"{where}.reported[{i}].weights: '{r['weights']}' is not a weights tag of {name}")
        measured = data["measured_on"].get(r["dataset"], MeasuredSplit())
        r.setdefault("split", measured.split)
        r.setdefault("num_samples", measured.num_samples)
        reported.append(ReportedMetric(**{**r, "value": float(r["value"])}))
    data["reported"] = tuple(reported)
    return ModelConfig(name=name, family=family.family, **data)


def parse_family_config(raw: Any, path: Path) -> FamilyConfig:
    """Validate one family file's parsed YAML into a :class:`FamilyConfig`."""
    where = str(path)
    data = _check_fields(raw, FamilyConfig, where, required=("family", "title", "models"))
    if data["family"] != path.stem:
        raise ConfigError(f"{where}: field 'family' is '{data['family']}' but the file is named '{path.stem}.yaml'")
    family = FamilyConfig(**{**data, "models": {}})
    models = {}
    for name, model in _typed(data["models"], dict, f"{where}: models").items():
        models[name] = _parse_model(name, model, family, f"{where}: models.{name}")
    return dataclasses.replace(family, models=models)


def load_family_config(path: Path) -> FamilyConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_family_config(raw, path)


@lru_cache(maxsize=None)
def all_model_configs() -> dict[str, ModelConfig]:
    """name -> ModelConfig over every ``configs/*.yaml``; a name defined twice is an error."""
    configs: dict[str, ModelConfig] = {}
    for path in sorted(configs_dir().glob("*.yaml")):
        for name, cfg in load_family_config(path).models.items():
            if name in configs:
                raise ConfigError(f"{path}: model '{name}' is already defined by family '{configs[name].family}'")
            configs[name] = cfg
    return configs
