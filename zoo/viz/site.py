"""``python -m zoo site --out DIR [--results DIR]``: the zoo as a static site (plain HTML and CSS, no
script, no server: open ``DIR/index.html`` from the file system).

- ``index.html``: every registered model in one table, filtered by family and task (CSS radio
  buttons), with its reported and, where a result file has it, reproduced numbers;
- ``models/<name>.html``: the model's card (architecture, weights, preprocessing, license, paper,
  evaluation), reported vs reproduced metrics, the command lines that reproduce each number, its plots
  (training loss from the weights folder's record, ``pr_curve.png`` / ``cmc.png`` of its evaluations) and
  its visualisations.

``--results DIR`` is searched (recursively) for what ``zoo eval --out FILE.json`` writes (the JSON and the
plots beside it; a plot that a later evaluation into the same folder replaced is left out, told by
its sha256) and for ``zoo visualize --out`` folders (their ``visualize.json``). Everything a page shows is
copied into the site, so the folder can be moved or published as it is.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from zoo._fs import replace_dir, sha256_file
from zoo.config import FamilyConfig, ModelConfig, ReportedMetric, load_family_config
from zoo.errors import ZooError
from zoo.hub import FOLDER_PLOTS, read_folder_config
from zoo.paths import configs_dir
from zoo.registry import list_models, model_constructor, model_info
from zoo.viz.curves import plot_loss, plot_metrics
from zoo.viz.figure import save_figure
from zoo.viz.html import STYLE, code_block, escape, figure, page, table
from zoo.viz.visualize import MANIFEST, read_manifest
from zoo.weights import parse_source

__all__ = ["build_site", "SITE_MARKER", "EvalRecord", "find_results", "find_visualizations"]

#: Written into every site folder: what ``zoo site`` may replace.
SITE_MARKER = "site.json"
_RESULT_KEYS = ("model", "protocol", "rows", "metrics")


# =============================================================================================
# What --results holds


@dataclass
class EvalRecord:
    """One ``zoo eval`` result file: its path and JSON."""

    path: Path
    data: dict

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def weights(self) -> Optional[str]:
        return self.data.get("weights")

    @property
    def limited(self) -> bool:
        return bool(self.data.get("limited"))

    def plots(self) -> list[Path]:
        """The plots beside the JSON that are still this evaluation's (same sha256 as recorded)."""
        found = []
        for curve, entry in (self.data.get("plots") or {}).items():
            path = self.path.parent / str(entry.get("file", ""))
            if not path.is_file():
                continue
            if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                warnings.warn(f"{path} was replaced after {self.path} was written (another evaluation into the "
                              f"same folder?): not shown with that result", stacklevel=2)
                continue
            found.append(path)
        return found


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_results(root: Path) -> list[EvalRecord]:
    """Every ``zoo eval`` results JSON under ``root`` (other JSON files are passed over), sorted by path."""
    records = []
    for path in sorted(Path(root).rglob("*.json")):
        data = _json(path)
        if isinstance(data, dict) and all(key in data for key in _RESULT_KEYS):
            records.append(EvalRecord(path, data))
    return records


def find_visualizations(root: Path) -> list[tuple[Path, dict]]:
    """Every ``zoo visualize`` folder under ``root``: (folder, its manifest), sorted by path."""
    found = []
    for path in sorted(Path(root).rglob(MANIFEST)):
        manifest = read_manifest(path.parent)
        if manifest is not None:
            found.append((path.parent, manifest))
    return found


# =============================================================================================
# Reading a model's facts


@lru_cache(maxsize=None)
def _family(family: str) -> Optional[FamilyConfig]:
    path = configs_dir() / f"{family}.yaml"
    return load_family_config(path) if path.is_file() else None


def _local_folder(cfg: ModelConfig, tag: str) -> Optional[Path]:
    """The weights entry's folder when it is a local RelZoo folder (the committed minis), else None."""
    src = parse_source(cfg.weights[tag].source)
    if src.kind == "local" and src.path is not None and src.path.is_dir():
        return src.path
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def _commands_in(text: str) -> list[str]:
    """The ``python -m zoo ...`` commands quoted in backticks in a config note."""
    return [" ".join(c.split()) for c in re.findall(r"`(python -m zoo [^`]+)`", text or "")]


def _reproduced(records: list[EvalRecord], cfg: ModelConfig, row: ReportedMetric) -> Optional[tuple[float, EvalRecord]]:
    """The reproduced value of a reported row: a full evaluation of the same weights on the same dataset
    (a --limit one only when there is no full one)."""
    tag = row.weights or cfg.default_weights
    matching = [r for r in records if r.model == cfg.name and r.data.get("dataset") in (row.dataset, None)
                and (r.weights == tag or (row.weights is None and r.weights in (None, cfg.default_weights)))
                and row.metric in r.data.get("metrics", {})]
    if not matching:
        return None
    best = sorted(matching, key=lambda r: (r.limited, str(r.path)))[0]
    return float(best.data["metrics"][row.metric]), best


# =============================================================================================
# Pages


def _filters(values: dict[str, list[str]]) -> tuple[str, str]:
    """Radio inputs (siblings of the table) and their labels, and the CSS that hides the other rows."""
    inputs, labels, css = [], [], []
    for group, options in values.items():
        inputs.append(f'<input class="filter" type="radio" name="{group}" id="{group}-all" checked>')
        group_labels = [f'<label for="{group}-all">all</label>']
        css.append(f'#{group}-all:checked ~ .filters label[for="{group}-all"]')
        for option in options:
            ident = f"{group}-{_slug(option)}"
            inputs.append(f'<input class="filter" type="radio" name="{group}" id="{ident}">')
            group_labels.append(f'<label for="{ident}">{escape(option)}</label>')
            css.append(f'#{ident}:checked ~ .filters label[for="{ident}"]')
        labels.append(f"<div>{escape(group)}: {' '.join(group_labels)}</div>")
    style = ",\n".join(css) + " { background: #0969da; color: #ffffff; border-color: #0969da; }\n"
    for group, options in values.items():
        for option in options:
            ident = f"{group}-{_slug(option)}"
            style += f"#{ident}:checked ~ table tbody tr:not(.{ident}) {{ display: none; }}\n"
    return "\n".join(inputs) + '\n<div class="filters">' + "\n".join(labels) + "</div>", style


def _index(configs: list[ModelConfig], records: list[EvalRecord], results_given: bool) -> tuple[str, str]:
    rows, attrs = [], []
    for cfg in configs:
        shown = cfg.reported_for(None)[:2]
        reported = "; ".join(f"{escape(r.metric)} {r.value:g}" for r in shown) or "-"
        reproduced = []
        for r in shown:
            found = _reproduced(records, cfg, r)
            if found is not None:
                reproduced.append(f"{escape(r.metric)} {found[0]:.2f}")
        weights = ", ".join(f"<code>{escape(t)}</code>" for t in cfg.weights) or '<span class="muted">none published</span>'
        rows.append([f'<a href="models/{escape(cfg.name)}.html"><code>{escape(cfg.name)}</code></a>',
                     escape(cfg.family), escape(cfg.task), weights, reported, "; ".join(reproduced) or "-"])
        attrs.append(f'class="family-{_slug(cfg.family)} task-{_slug(cfg.task)}"')
    filters, style = _filters({"family": sorted({c.family for c in configs}), "task": sorted({c.task for c in configs})})
    note = ("reproduced: read from the result files given with <code>--results</code>" if results_given else
            "reproduced: none given (<code>python -m zoo site --results DIR</code> reads <code>zoo eval --out</code> files)")
    body = (f"<h1>RelZoo</h1>\n<p>{len(configs)} models of relation- and relative-position-aware attention in "
            f"vision. Pick a family or a task to filter; {note}.</p>\n{filters}\n"
            + table(["model", "family", "task", "weights", "reported", "reproduced"], rows, row_attrs=attrs))
    return body, style


def _card(cfg: ModelConfig) -> str:
    family = _family(cfg.family)
    constructor = model_constructor(cfg.name)
    doc = (constructor.__doc__ or "").strip().split("\n\n")[0]
    paper = getattr(cfg, "paper", None) or (family.paper if family else "")
    license_ = getattr(cfg, "license", None)
    facts = [("family", f"{escape(cfg.family)}" + (f": {escape(family.title)}" if family else "")),
             ("task", escape(cfg.task)),
             ("architecture", escape(cfg.description or doc) + "<br>"
              f"<code>{escape(constructor.__module__)}.{escape(constructor.__name__)}(**{escape(json.dumps(cfg.kwargs))})</code>"),
             ("preprocessing", f"<code>{escape(json.dumps(dict(cfg.preprocessing)))}</code>" if cfg.preprocessing else "-"),
             ("evaluation", f"<code>{escape(json.dumps(cfg.eval))}</code>" if cfg.eval else "no protocol"),
             ("license", escape(str(license_)) if license_ else '<span class="muted">not stated in the config</span>'),
             ("paper", escape(paper) if paper else '<span class="muted">not stated in the config</span>')]
    spec = family.spec if family else ""
    if spec:
        facts.append(("spec", f"<code>{escape(spec)}</code>"))
    dl = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    weights = table(["tag", "source", "sha256", "converter", "note"], [
        [f"<code>{escape(t)}</code>" + (" (default)" if t == cfg.default_weights else ""),
         f"<code>{escape(e.source)}</code>", f"<code>{escape(e.sha256 or 'unknown')}</code>",
         escape(e.converter or "-"), escape(e.note)] for t, e in cfg.weights.items()]) if cfg.weights else \
        '<p class="muted">No weights published.</p>'
    notes = f"<p>{escape(cfg.notes)}</p>" if cfg.notes else ""
    return dl + "\n<h2>Weights</h2>\n" + weights + notes


def _eval_commands(cfg: ModelConfig, tag: Optional[str], records: list[EvalRecord]) -> list[str]:
    """Command lines that reproduce the numbers of weights ``tag``: a result's own, else made from the config."""
    name = f"{cfg.name}.{tag}" if tag else cfg.name
    mine = [r for r in records if r.model == cfg.name and r.weights == (tag or cfg.default_weights) and r.data.get("command")]
    if mine:
        return [mine[0].data["command"]]
    folder = _local_folder(cfg, tag) if tag else None
    record = (read_folder_config(folder) or {}).get("train", {}) if folder else {}
    synthetic = (record.get("dataset") or {}).get("synthetic")
    if synthetic and synthetic.get("kind"):
        kind, seed = synthetic["kind"], synthetic.get("seed", 0)
        data = f"data/{kind}"
        return [shlex.join(["python", "-m", "zoo", "data", "make", kind, "--out", data, "--split", "val", "--seed", str(seed)]),
                shlex.join(["python", "-m", "zoo", "eval", name, "--data", data])]
    return [f"python -m zoo eval {name} --data DIR   # DIR: {cfg.eval.get('dataset', 'the dataset')} in its "
            "original layout"] if cfg.eval else []


def _metrics_section(cfg: ModelConfig, records: list[EvalRecord], copy) -> str:
    rows = []
    for r in cfg.reported:
        found = _reproduced(records, cfg, r)
        if found is None:
            reproduced, difference = '<span class="muted">not evaluated</span>', ""
        else:
            value, record = found
            partial = " (--limit, partial)" if record.limited else ""
            reproduced = f'<a href="{escape(copy(record.path))}">{value:.2f}</a>{partial}'
            diff = value - r.value
            difference = f'<span class="{"good" if abs(diff) <= 0.1 else "bad"}">{diff:+.2f}</span>'
        rows.append([escape(r.metric), escape(r.dataset), escape(r.weights or "paper"), f"{r.value:g}", reproduced,
                     difference, escape(r.source) + ("" if r.verified else " (unverified)")])
    reported = {(r.metric, r.dataset) for r in cfg.reported}
    for record in records:
        if record.model != cfg.name:
            continue
        for metric, value in record.data.get("metrics", {}).items():
            if (metric, record.data.get("dataset")) not in reported:
                rows.append([escape(metric), escape(str(record.data.get("dataset"))), escape(str(record.weights)), "",
                             f'<a href="{escape(copy(record.path))}">{value:.2f}</a>', "", "not reported"])
    html = "<h2>Reported and reproduced</h2>\n"
    html += table(["metric", "dataset", "weights", "reported", "reproduced", "difference", "source"], rows,
                  numeric=(3, 4, 5)) if rows else '<p class="muted">Nothing reported and nothing evaluated.</p>'
    html += "\n<h2>Reproduce</h2>\n"
    tags = list(dict.fromkeys([r.weights or cfg.default_weights for r in cfg.reported] + list(cfg.weights)))
    for tag in tags or [None]:
        commands = _eval_commands(cfg, tag, records)
        if commands:
            html += f"<p>Evaluate {'the <code>' + escape(tag) + '</code> weights' if tag else 'the model'}:</p>" + code_block(commands)
    for tag, entry in cfg.weights.items():
        commands = _commands_in(entry.note)
        if commands:
            html += f"<p>Train the <code>{escape(tag)}</code> weights:</p>" + code_block(commands)
    return html


def _plots_section(cfg: ModelConfig, records: list[EvalRecord], assets: Path, rel: str, copy) -> str:
    figures = []
    for tag in cfg.weights:
        folder = _local_folder(cfg, tag)
        if folder is None:
            continue
        train = (read_folder_config(folder) or {}).get("train") or {}
        for name in FOLDER_PLOTS:  # drawn by zoo train; else drawn here from the training record
            if (folder / name).is_file():
                figures.append(figure(copy(folder / name), f"{tag}: {name[:-4]}", "as zoo train drew it"))
        if not (folder / "loss.png").is_file() and train.get("loss_per_epoch"):
            file = f"loss_{_slug(tag)}.png"
            save_figure(plot_loss(train["loss_per_epoch"], title=f"{cfg.name}.{tag}: training loss"), assets / file)
            figures.append(figure(f"{rel}/{file}", f"{tag}: training loss",
                                  f"mean loss per epoch, from the training record in {folder.name}/config.json"))
        if not (folder / "metrics.png").is_file() and train.get("val_metrics_per_epoch"):
            file = f"metrics_{_slug(tag)}.png"
            save_figure(plot_metrics(train["val_metrics_per_epoch"]), assets / file)
            figures.append(figure(f"{rel}/{file}", f"{tag}: validation", "metrics after every epoch"))
    for record in records:
        if record.model == cfg.name:
            for plot in record.plots():
                figures.append(figure(copy(plot), f"{plot.stem} ({record.weights or 'given weights'})",
                                      f"from {record.path.name}"))
    return "<h2>Plots</h2>\n" + ("\n".join(figures) or '<p class="muted">No training record or evaluation plot.</p>')


def _visualizations_section(cfg: ModelConfig, visualizations: list[tuple[Path, dict]], copy) -> str:
    html = []
    for folder, manifest in visualizations:
        if manifest["model"] != cfg.name:
            continue
        html.append(f"<p>Input <code>{escape(str(manifest.get('input')))}</code>"
                    + (f", weights <code>{escape(str(manifest['weights']))}</code>" if manifest.get("weights") else "")
                    + "</p>")
        for entry in manifest["figures"]:
            path = folder / str(entry.get("file", ""))
            if path.is_file():
                html.append(figure(copy(path), str(entry.get("title", path.stem)), str(entry.get("caption", ""))))
    return "<h2>Visualisations</h2>\n" + ("\n".join(html) or
                                          '<p class="muted">None given (<code>python -m zoo visualize NAME --image IMG '
                                          '--out DIR</code>, then <code>zoo site --results</code> a folder holding DIR).</p>')


def _model_page(cfg: ModelConfig, records: list[EvalRecord], visualizations: list, site: Path) -> str:
    assets = site / "models" / cfg.name  # made when the page has a file to show
    copied: dict[Path, str] = {}

    def copy(path: Path) -> str:
        """Copy a file into the model's asset folder (once); returns its link from the model page."""
        path = Path(path).resolve()
        if path not in copied:
            name, stem, n = path.name, path.stem, 1
            while (assets / name).exists():
                n += 1
                name = f"{stem}-{n}{path.suffix}"
            assets.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, assets / name)
            copied[path] = f"{cfg.name}/{name}"
        return copied[path]

    body = [f'<p><a href="../index.html">RelZoo</a> / {escape(cfg.family)}</p>',
            f"<h1><code>{escape(cfg.name)}</code></h1>", _card(cfg), _metrics_section(cfg, records, copy),
            _plots_section(cfg, records, assets, cfg.name, copy), _visualizations_section(cfg, visualizations, copy)]
    return page(f"{cfg.name}: RelZoo", "\n".join(body), css="../style.css")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SITE_MARKER).is_file())):
        raise ZooError(f"output {out} exists and is not a site zoo site wrote; choose another --out")


def build_site(out: Union[str, os.PathLike], results: Union[str, os.PathLike, None] = None) -> Path:
    """Write the static site into the folder ``out`` (new, empty or an earlier site, replaced as a whole);
    ``results``: a folder searched for ``zoo eval`` results and ``zoo visualize`` folders. Returns index.html."""
    out = Path(out)
    _check_out(out)
    if results is not None and not Path(results).is_dir():
        raise ZooError(f"--results {results} is not a folder")
    records = find_results(Path(results)) if results is not None else []
    visualizations = find_visualizations(Path(results)) if results is not None else []
    configs = [model_info(name) for name in list_models()]
    known = {cfg.name for cfg in configs}
    for record in records:
        if record.model not in known:
            warnings.warn(f"{record.path}: results of '{record.model}', which is not a registered model; not shown",
                          stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "models").mkdir()
        index, filter_style = _index(configs, records, results is not None)
        (tmp / "style.css").write_text(STYLE, encoding="utf-8")
        (tmp / "index.html").write_text(page("RelZoo", index, css="style.css", extra_style=filter_style),
                                        encoding="utf-8")
        for cfg in configs:
            (tmp / "models" / f"{cfg.name}.html").write_text(_model_page(cfg, records, visualizations, tmp),
                                                             encoding="utf-8")
        marker = {"models": [cfg.name for cfg in configs], "results": [str(r.path) for r in records],
                  "visualizations": [str(folder) for folder, _ in visualizations]}
        (tmp / SITE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"
