"""``python -m zoo list | info | convert | export | predict | eval``.

Every failure RelZoo reports on purpose (:class:`~zoo.errors.ZooError`, bad arguments)
ends as one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from zoo.errors import ZooError
from zoo.eval.runner import DEFAULT_BATCH_SIZE


def _cmd_list(args) -> int:
    from zoo.registry import list_models, model_info

    for name in list_models(args.pattern, pretrained=args.pretrained):
        cfg = model_info(name)
        print(f"{name:<55} {cfg.task}")
    return 0


def format_info(name: str) -> str:
    """What ``zoo info NAME`` prints: description, kwargs, weights, reported table, notes."""
    from zoo.registry import model_info

    cfg = model_info(name)
    lines = [f"{cfg.name}  ({cfg.family}: {cfg.task})"]
    if cfg.description:
        lines.append(f"  {cfg.description}")
    if cfg.kwargs:
        lines.append(f"  constructor kwargs: {json.dumps(cfg.kwargs)}")
    if cfg.preprocessing:
        lines.append(f"  preprocessing: {json.dumps(cfg.preprocessing)}")
    if cfg.eval:
        lines.append(f"  evaluation: {json.dumps(cfg.eval)}")
    lines.append("  weights:" if cfg.weights else "  weights: none published")
    for tag, entry in cfg.weights.items():
        default = " (default)" if tag == cfg.default_weights else ""
        sha = entry.sha256 or "unknown (recorded on first download)"
        conv = f", converted with '{entry.converter}'" if entry.converter else ""
        lines.append(f"    {cfg.name}.{tag}{default}: {entry.source}{conv}; sha256 {sha}")
        if entry.note:
            lines.append(f"      {entry.note}")
    if cfg.reported:
        lines += ["  reported:", "    | metric | value | dataset | weights | source |", "    |---|---|---|---|---|"]
        for r in cfg.reported:
            flag = "" if r.verified else " (unverified)"
            note = f"; {r.note}" if r.note else ""
            lines.append(f"    | {r.metric} | {r.value:g} | {r.dataset} | {r.weights or 'paper'} | {r.source}{flag}{note} |")
    if cfg.notes:
        lines += ["  notes:"] + [f"    {line}" for line in cfg.notes.strip().splitlines()]
    return "\n".join(lines)


def _cmd_info(args) -> int:
    print(format_info(args.name))
    return 0


def _cmd_convert(args) -> int:
    from zoo.factory import convert_checkpoint

    kwargs = json.loads(args.kwargs) if args.kwargs else None
    out = convert_checkpoint(args.src, args.from_map, args.out, model_name=args.model, model_kwargs=kwargs,
                             strict=not args.non_strict)
    print(f"converted {args.src} -> {out}")
    return 0


def _cmd_export(args) -> int:
    from zoo.export import export_model

    out = export_model(args.name, args.out, weights=args.weights)
    print(f"exported {args.name} -> {out}")
    return 0


def _rounded(value, digits: int = 3):
    """Floats of a JSON-like value rounded, for printing."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _cmd_predict(args) -> int:
    from zoo.predict import predict

    predictions = predict(args.name, args.image, args.out, threshold=args.threshold, device=args.device,
                          weights=args.weights)
    for prediction in predictions:
        print(json.dumps(_rounded(prediction)))
    print(f"wrote {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from zoo.eval.runner import evaluate

    options = json.loads(args.options) if args.options else None
    result = evaluate(args.name, args.data, weights=args.weights, batch_size=args.batch_size, workers=args.workers,
                      device=args.device, limit=args.limit, out=args.out, options=options,
                      progress=not args.no_progress)
    if result is not None:
        print(result.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zoo", description="RelZoo: relation-aware attention model zoo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models", description="List registered models.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'rga_*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag for every weights entry")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a model's config, weights and reported table",
                       description="Show a model's variants, weights entries, reported metrics and notes.")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert an original checkpoint to safetensors",
                       description="Convert an original project's checkpoint into a RelZoo folder "
                                   "(model.safetensors + config.json + README.md).")
    p.add_argument("--from", dest="from_map", required=True, metavar="FAMILY",
                   help="conversion map in convert/ (e.g. rga, rsa, irpe-detr, irpe-deit, sasa-leader, torchvision-resnet)")
    p.add_argument("src", help="original checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="target model name (default: the map's target_model)")
    p.add_argument("--kwargs", help="JSON constructor kwargs of the target model, e.g. '{\"num_classes\": 751}'")
    p.add_argument("--non-strict", action="store_true", help="report but allow missing/unexpected keys")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a Hugging Face-ready folder",
                       description="Write model.safetensors, config.json and a model card for upload to the Hub.")
    p.add_argument("name", help="model or model.tag")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", help="weights source (default: the tag's or default weights; random if none)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="run a model on one image", description="Run a model on an image and draw the result.")
    p.add_argument("name", help="model or model.tag")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output image (PNG)")
    p.add_argument("--weights", help="weights source overriding the tag")
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score to draw (detection)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("eval", help="evaluate with the original protocol",
                       description="Evaluate a model with its paper's protocol and compare with the reported table. "
                                   "Runs unchanged under torchrun for several processes.")
    p.add_argument("name", help="model or model.tag")
    p.add_argument("--data", required=True, help="dataset root in the original on-disk format")
    p.add_argument("--weights", help="weights source overriding the tag (tag, path, URL, hf://)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="samples per batch (detectors pad a batch to its largest image: numbers vary a little with it)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--limit", type=int, help="evaluate only the first N samples (a quick, partial check)")
    p.add_argument("--out", help="write results as JSON (and a markdown table beside it)")
    p.add_argument("--options", help="JSON overrides of the protocol options")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    _add_extra_commands(sub)
    return parser


def _add_extra_commands(sub) -> None:
    """Commands defined by other modules (data generation, training, demo) when present."""
    import importlib

    for module in ("zoo.data.synthetic", "zoo.train", "zoo.demo"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.add_cli(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
