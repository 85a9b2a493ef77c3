"""The RelZoo folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (a model card), and the
Hugging Face round trip: :func:`save_pretrained`, :func:`push_to_hub` (and, a floor up where models
are built, :func:`zoo.factory.from_pretrained`).

What ``zoo convert``, ``zoo export`` and ``zoo train`` write, what ``create_model(name, weights=DIR)``,
``weights='hf://org/repo[@rev]'`` and ``from_pretrained`` read, and what the Hugging Face Hub shows
(timm's ``_hub.py`` role): the file names, reading and writing the folder, and the model card
(``huggingface_hub.ModelCard``), all in this one place.

``config.json`` holds ``{"model": registry name, "kwargs": constructor kwargs, "source": where the
weights came from, ...}`` (``converter``, ``converter_version`` and ``source_sha256`` for conversions;
``incomplete`` for a strict=False conversion; ``pretrained_cfg`` (label names, preprocessing, reported
metrics, license) and ``license`` for :func:`save_pretrained`). Writing is atomic: readers see the old
folder or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import Tensor, nn

from zoo._fs import first_line, replace_dir
from zoo.checkpoint import as_state_dict, load_checkpoint, save_safetensors
from zoo.config import ModelConfig, PretrainedCfg
from zoo.errors import ConversionError, UploadError, WeightsError, ZooError
from zoo.paths import offline
from zoo.registry import model_info

__all__ = ["FOLDER_WEIGHTS", "FOLDER_CONFIG", "FOLDER_CARD", "FOLDER_PLOTS", "HF_FALLBACK_WEIGHTS",
           "read_folder_config", "load_folder_weights", "write_model_folder", "check_out_dir", "model_card", "jsonable",
           "save_pretrained", "push_to_hub", "PIPELINE_TAGS"]

FOLDER_WEIGHTS = "model.safetensors"
FOLDER_CONFIG = "config.json"
FOLDER_CARD = "README.md"
HF_FALLBACK_WEIGHTS = "pytorch_model.bin"  # transformers' name, read when a Hub repo has no safetensors
FOLDER_PLOTS = ("loss.png", "metrics.png")  # training curves `zoo train` draws beside the weights
_FOLDER_FILES = (FOLDER_WEIGHTS, FOLDER_CONFIG, FOLDER_CARD, *FOLDER_PLOTS)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_folder_config(folder: Path) -> dict | None:
    """The ``config.json`` of a local RelZoo folder as a dict, or None when the folder has none.

    A config.json that is not a JSON object raises WeightsError naming the file."""
    config_path = Path(folder) / FOLDER_CONFIG
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: a hostile nesting depth
        raise WeightsError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    for key, kind in (("model", str), ("kwargs", dict)):
        if config.get(key) is not None and not isinstance(config[key], kind):
            raise WeightsError(f"{config_path}: field '{key}' must be a {'string' if kind is str else 'JSON object'}, "
                               f"got {type(config[key]).__name__}")
    return config


def load_folder_weights(folder: Path) -> dict[str, Tensor]:
    """The state dict of a RelZoo folder: its ``model.safetensors`` (or a Hub repo's ``pytorch_model.bin``)."""
    for name in (FOLDER_WEIGHTS, HF_FALLBACK_WEIGHTS):
        if (folder / name).is_file():
            return as_state_dict(load_checkpoint(folder / name), folder / name)
    raise WeightsError(f"folder {folder} has no {FOLDER_WEIGHTS}; convert a checkpoint into it with "
                       f"`python -m zoo convert --from MAP SRC --out {folder}`")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_model_folder(out_dir: str | os.PathLike, state_dict: Mapping[str, Tensor], config: dict, card: str,
                       metadata: dict[str, str] | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (the card) atomically.

    The layout ``create_model(name, weights=DIR)`` loads and the Hugging Face Hub shows; used by
    ``zoo convert``, ``zoo export`` and ``zoo train``, whose training curves come as ``extra_files``
    (file name in :data:`FOLDER_PLOTS` -> PNG bytes). Readers see the old folder or the new one, never half of one.
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(extra_files or {}) - set(FOLDER_PLOTS))
    if unknown:
        raise ValueError(f"write_model_folder: extra files {unknown} are not part of the folder format "
                         f"(allowed: {', '.join(FOLDER_PLOTS)})")
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_safetensors(state_dict, tmp / FOLDER_WEIGHTS,
                         metadata={"format": "pt", "relzoo_model": str(config["model"]), **(metadata or {})})
        (tmp / FOLDER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / FOLDER_CARD).write_text(card, encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier conversion."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"output {out_dir} exists and is not a folder")
        entries = {p.name for p in out_dir.iterdir()}
        if entries and not (out_dir / FOLDER_CONFIG).is_file():
            raise ConversionError(f"output folder {out_dir} is not empty and not a RelZoo conversion; "
                                  f"choose another --out or empty it")
        if entries - set(_FOLDER_FILES):
            raise ConversionError(f"output folder {out_dir} holds other files ({', '.join(sorted(entries))}); "
                                  f"choose another --out")


def jsonable(value: Any) -> Any:
    """``value`` (constructor kwargs) as JSON-storable data; anything else is a ConversionError naming it."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise ConversionError(f"model kwarg value {value!r} ({type(value).__name__}) cannot be stored in config.json")


def _registered_config(name: str) -> ModelConfig | None:
    """The registry's config of ``name``, or None for a caller-built model that is not registered."""
    try:
        return model_info(name)
    except ZooError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


#: A model config's ``task`` -> the Hugging Face pipeline tag of its cards.
PIPELINE_TAGS = {"detection": "object-detection", "image classification": "image-classification",
                 "classification": "image-classification", "video classification": "video-classification",
                 "person re-identification": "image-feature-extraction"}
UNKNOWN_LICENSE = "unknown"  # Hugging Face's license id when none is stated


def model_card(name: str, config: dict, origin: str, extra_tags: Sequence[str] = (), *,
               pretrained_cfg: PretrainedCfg | None = None, eval_results: Mapping | None = None,
               repo_id: str | None = None) -> str:
    """A Hugging Face model card, made with ``huggingface_hub.ModelCard`` (so ``ModelCard.load`` reads it).

    Front matter (``ModelCardData``): ``library_name: relzoo``, ``license``, ``pipeline_tag``, ``tags``
    (the family, the task, the paper's ``arxiv:`` id) and ``model-index`` (``EvalResult``): the reported
    metrics of the weights this folder holds and, with ``eval_results`` (what ``zoo eval --out``
    writes), the reproduced ones. The body says where the weights came from, how to load them
    (``zoo.from_pretrained``, through ``hf://repo_id`` when known), their classes and preprocessing.

    ``pretrained_cfg``: the saved model's (:func:`save_pretrained`); without it (conversions,
    training) the registry's config of ``name`` is used and the reported rows are those of the
    weights entry this file matches (by sha256 or file name), else the paper's rows.
    """
    info = _registered_config(name)
    if pretrained_cfg is not None:
        tag, rows, task = pretrained_cfg.tag, list(pretrained_cfg.reported), pretrained_cfg.task
        license_id, paper, family = pretrained_cfg.license, pretrained_cfg.paper, pretrained_cfg.family
    else:
        tag = _matching_weights_tag(info, config) if info is not None else None
        # Rows of the weights entry this file is; otherwise only the paper's rows without released
        # weights: another entry's numbers would be misattributed.
        rows = [r for r in info.reported if r.weights == tag] if info is not None else []
        task = info.task if info is not None else ""
        license_id, paper, family = ((info.license, info.paper, info.family) if info is not None else (None, "", ""))
    pipeline_tag = PIPELINE_TAGS.get(task)
    arxiv = re.search(r"arxiv[: ]+(\d{4}\.\d{4,5})", paper or "", re.IGNORECASE)
    tags = ["relzoo", *([family] if family else []), *([_slug(task)] if task else []), *extra_tags,
            *([f"arxiv:{arxiv.group(1)}"] if arxiv else [])]
    results = [EvalResult(task_type=pipeline_tag or _slug(task or "unknown"), task_name=task or None,
                          dataset_type=r.dataset, dataset_name=r.dataset, dataset_split=r.split,
                          metric_type=r.metric, metric_name=r.metric, metric_value=r.value) for r in rows]
    reproduced = _reproduced_rows(eval_results)
    results += [EvalResult(task_type=pipeline_tag or _slug(task or "unknown"), task_name=task or None,
                           dataset_type=dataset, dataset_name=dataset, dataset_split=split, metric_type=metric,
                           metric_name=f"{metric} (reproduced by zoo eval)", metric_value=value)
                for metric, value, dataset, split, _ in reproduced]
    data = ModelCardData(library_name="relzoo", license=license_id or UNKNOWN_LICENSE, pipeline_tag=pipeline_tag,
                         tags=tags, model_name=name, eval_results=results or None)

    loader = f"hf://{repo_id}" if repo_id else "path/to/this/folder"
    body = [f"# {name}", ""]
    if info is not None and info.description:
        body += [" ".join(info.description.split()), ""]
    body += [origin, ""]
    if config.get("source"):
        body.append(f"- source: `{config['source']}`")
    if config.get("source_sha256"):
        body.append(f"- source sha256: `{config['source_sha256']}`")
    if paper:
        body.append(f"- paper: {paper}")
    body += [f"- license: {license_id or 'not stated'}", f"- constructor kwargs: `{json.dumps(config['kwargs'])}`", "",
             "```python", "import zoo",
             f"model = zoo.from_pretrained({loader!r})" + ("" if repo_id else "  # or hf://ORG/REPO once uploaded"),
             "transform = zoo.data.create_transform(zoo.data.resolve_data_config(model=model))", "```", ""]
    if pretrained_cfg is not None and pretrained_cfg.preprocessing:
        body += [f"Preprocessing: `{json.dumps(dict(pretrained_cfg.preprocessing))}`", ""]
    if pretrained_cfg is not None and pretrained_cfg.label_names:
        body += [f"Classes ({len(pretrained_cfg.label_names)}, by class id): "
                 + ", ".join(f"{i} {n}" for i, n in enumerate(pretrained_cfg.label_names)), ""]
    if rows:
        note = (f"for the `{tag}` weights" if tag is not None
                else "by the paper, for the architecture; not measured on this file")
        body += [f"Reported metrics ({note}):", "", "| metric | value | dataset | source |", "|---|---|---|---|"]
        body += [f"| {r.metric} | {r.value} | {r.dataset} | {r.source or ''} |" for r in rows]
        body.append("")
    if reproduced:
        body += ["Reproduced by `zoo eval`:", "", "| metric | value | dataset | samples |", "|---|---|---|---|"]
        body += [f"| {metric} | {value:.2f} | {dataset} | {samples} |" for metric, value, dataset, _, samples in reproduced]
        body.append("")
    if "incomplete" in config:
        body += ["**Incomplete conversion** (strict=False): see `incomplete` in config.json.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))  # parses and checks the metadata
    return str(card)


def _reproduced_rows(eval_results: Mapping | None) -> list[tuple[str, float, str, str | None, int]]:
    """(metric, value, dataset, split, samples) of a ``zoo eval --out`` result; a partial (--limit) one is refused."""
    if not eval_results:
        return []
    if eval_results.get("limited"):
        raise ConversionError("the eval results are from a --limit run (a partial evaluation); the model card "
                              "lists full evaluations only")
    dataset = str(eval_results.get("dataset") or eval_results.get("protocol"))
    return [(str(metric), float(value), dataset, eval_results.get("split"), int(eval_results.get("num_samples", 0)))
            for metric, value in (eval_results.get("metrics") or {}).items()]


def _matching_weights_tag(info: ModelConfig, config: dict) -> str | None:
    """The weights tag of the registry entry this file came from (same sha256, or same file name)."""
    src_name = Path(str(config.get("source", ""))).name
    for tag, entry in info.weights.items():
        if entry.sha256 and entry.sha256 == config.get("source_sha256"):
            return tag
    for tag, entry in info.weights.items():
        if entry.source and Path(entry.source).name == src_name:
            return tag
    return None


# --------------------------------------------------------------------------------------------
# The Hugging Face round trip
# --------------------------------------------------------------------------------------------

# Constructor kwargs that fetch something on construction: a saved folder must not record them, or
# loading it would download ImageNet weights only to overwrite them.
DOWNLOADING_KWARGS = ("pretrained_backbone",)


def _is_public(source: str | None) -> bool:
    """An address others can load: an http(s) URL or an ``hf://`` id (not a path on this machine)."""
    return bool(source) and re.match(r"(https?|hf)://", source) is not None


def _saved_kwargs(model: nn.Module, cfg: PretrainedCfg) -> dict:
    """What ``create_model`` needs to build ``model`` again: the kwargs it was built with, updated with
    the head it has now (``reset_classifier`` changes ``num_classes`` and the pooling)."""
    kwargs = {key: (False if key in DOWNLOADING_KWARGS else value) for key, value in cfg.model_kwargs.items()}
    if getattr(model, "num_classes", None) is not None:
        kwargs["num_classes"] = model.num_classes
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and ("global_pool" in kwargs or pool not in ("avg", "token")):
        kwargs["global_pool"] = pool
    return jsonable(kwargs)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, repo_id: str | None = None,
                    eval_results: str | os.PathLike | Mapping | None = None) -> Path:
    """Write ``model`` as a RelZoo folder that :func:`zoo.from_pretrained` rebuilds from alone.

    Args:
        model: built by :func:`zoo.create_model` or ``zoo.from_pretrained`` (its ``pretrained_cfg``
            names the model and the kwargs it was built with; the current head is recorded).
        save_directory: new, empty, or an earlier RelZoo folder (replaced atomically).
        repo_id: the Hub repo the folder is for (``org/name``): ``source`` and the card's usage line
            become ``hf://repo_id``.
        eval_results: a ``zoo eval --out`` JSON file (or its dict): its metrics go into the card's
            ``model-index`` as reproduced results.

    Writes ``model.safetensors``, ``config.json`` (``model``, ``kwargs``, ``source`` (a URL or
    ``hf://`` id, never a local path; left out when the weights have none), ``source_sha256``,
    ``license``, ``pretrained_cfg``: label names, preprocessing, reported metrics) and ``README.md``
    (:func:`model_card`). Returns the folder.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, PretrainedCfg):
        raise ConversionError(f"save_pretrained needs a model built by zoo.create_model or zoo.from_pretrained "
                              f"(its pretrained_cfg names the model and its kwargs); {type(model).__name__} has none")
    if isinstance(eval_results, (str, os.PathLike)):
        try:
            eval_results = json.loads(Path(eval_results).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"cannot read the eval results {eval_results}: {exc}") from exc
    kwargs = _saved_kwargs(model, cfg)
    if cfg.label_names is not None and kwargs.get("num_classes") not in (None, len(cfg.label_names)):
        raise ConversionError(f"pretrained_cfg.label_names has {len(cfg.label_names)} names but the model has "
                              f"{kwargs['num_classes']} classes; set model.pretrained_cfg = "
                              f"model.pretrained_cfg.replace(label_names=[...])")
    source = f"hf://{repo_id}" if repo_id else (cfg.source if _is_public(cfg.source) else None)
    essentials = {key: value for key, value in cfg.to_dict().items()
                  if key in ("tag", "task", "num_classes", "in_chans", "label_names", "reported", "license", "paper")}
    essentials["preprocessing"] = dict(cfg.preprocessing)
    config: dict[str, Any] = {"model": cfg.architecture, "kwargs": kwargs}
    if source:
        config["source"] = source
    if cfg.sha256:
        config["source_sha256"] = cfg.sha256
    config.update({"license": cfg.license or UNKNOWN_LICENSE, "pretrained_cfg": jsonable(essentials)})
    if cfg.tag:
        origin = f"The `{cfg.tag}` weights of RelZoo's `{cfg.architecture}`, saved by `zoo.save_pretrained`."
    elif cfg.source:
        origin = f"Weights of `{cfg.architecture}` saved by `zoo.save_pretrained`."
    else:
        origin = f"`{cfg.architecture}` with random weights (not trained), saved by `zoo.save_pretrained`."
    card = model_card(cfg.architecture, config, origin, pretrained_cfg=cfg, eval_results=eval_results,
                      repo_id=repo_id)
    return write_model_folder(save_directory, model.state_dict(), config, card)


def push_to_hub(model: nn.Module, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str | None = None,
                eval_results: str | os.PathLike | Mapping | None = None, create_repo: bool = True,
                endpoint: str | None = None) -> str:
    """:func:`save_pretrained` into a temporary folder and upload it to ``repo_id`` with
    ``huggingface_hub.HfApi`` (``create_repo`` with ``exist_ok``, then ``upload_folder``).

    ``endpoint``: the Hub's address (default ``$HF_ENDPOINT``, else huggingface.co); ``token``: as
    huggingface_hub takes it (default: the saved login or ``HF_TOKEN``). Returns the ``hf://`` id
    of the upload (``hf://org/name@<commit>``), which :func:`zoo.from_pretrained` loads. A refusal of
    the Hub (authentication, a missing revision, the network) is an :class:`~zoo.errors.UploadError`.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if offline():
        raise UploadError(f"push to hf://{repo_id}: offline mode (RELZOO_OFFLINE / HF_HUB_OFFLINE) never opens a "
                          f"connection; unset it to upload")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token, library_name="relzoo")
    with tempfile.TemporaryDirectory(prefix="relzoo-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", repo_id=repo_id, eval_results=eval_results)
        try:
            if create_repo:
                api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message or f"Upload {model.pretrained_cfg.architecture} "
                                                                        f"with RelZoo")
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise UploadError(f"push to hf://{repo_id} failed: {first_line(exc)}") from exc
    return f"hf://{repo_id}@{commit.oid}"
