"""``python -m zoo list | info | convert | export | predict | eval | train | data make | demo | visualize | site``.

Every command is defined here. The arguments are parsed before anything heavy is imported: this
module imports only the standard library and zoo modules that need no torch, so ``--help`` of
every command answers at once; each handler imports what it runs inside its function, after
parsing (the one place where zoo modules are imported inside functions, for start-up time).

Every failure ends as one line on stderr: a failure RelZoo reports on purpose
(:class:`~zoo.errors.ZooError`, bad arguments) with exit code 2, anything else (a bug) with exit
code 1. ``--debug`` prints the whole message and the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from zoo.data.synthetic import DATASETS, SIZES, SPLITS, SUMMARIES, make_dataset, summary
from zoo._fs import first_line
from zoo.errors import ConfigError, ZooError
from zoo.eval import DEFAULT_BATCH_SIZE
from zoo.paths import disable_progress_bars
from zoo.registry import format_info, list_models, model_info, split_name

__all__ = ["main", "build_parser", "format_info"]


def _cmd_list(args) -> int:
    for name in list_models(args.pattern, pretrained=args.pretrained):
        print(f"{name:<55} {model_info(name).task}")
    return 0


def _cmd_info(args) -> int:
    print(format_info(args.name))
    return 0


def _json_object(text: Optional[str], flag: str) -> Optional[dict]:
    """The JSON object an option holds (None when not given); anything else is a ConfigError naming the option."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _cmd_convert(args) -> int:
    from zoo.factory import convert_checkpoint
    from zoo.hub import read_folder_config

    kwargs = _json_object(args.kwargs, "--kwargs")
    out = convert_checkpoint(args.src, args.from_map, args.out, model_name=args.model, model_kwargs=kwargs,
                             strict=not args.non_strict, ema=args.ema, trust_map=args.trust_map,
                             allow_nonfinite=args.allow_nonfinite)
    config = read_folder_config(out)
    print(f"converted {args.src} -> {out} (model {config['model']}, map {config['converter']})")
    return 0


def _cmd_export(args) -> int:
    from zoo.export import export_model

    out = export_model(args.name, args.out, weights=args.weights, format=args.format, input_size=args.input_size,
                       dynamic_batch=args.dynamic_batch, repo_id=args.push or args.repo_id,
                       eval_results=args.eval_results, push=bool(args.push))
    print(f"exported {args.name} ({args.format}) -> {out}" + (f" and pushed to hf://{args.push}" if args.push else ""))
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

    options = _json_object(args.options, "--options")
    result = evaluate(args.name, args.data, weights=args.weights, batch_size=args.batch_size, workers=args.workers,
                      device=args.device, limit=args.limit, out=args.out, options=options, plots=not args.no_plots)
    if result is not None:
        print(result.table())
    return 0


def _cmd_train(args) -> int:
    from zoo.train import train

    overrides = _json_object(args.kwargs, "--kwargs") or {}
    preprocessing = _json_object(args.preprocessing, "--preprocessing")
    validate = None
    if args.validate:
        from zoo.eval.runner import evaluate

        def validate(model):  # the model's own protocol on the val split of the same dataset
            return evaluate(args.name, args.data, model=model, device=args.device, progress=False).metrics

    out = train(args.name, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, limit=args.limit, device=args.device, weight_decay=args.weight_decay,
                lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm, num_instances=args.num_instances,
                preprocessing=preprocessing, plots=not args.no_plots, validate=validate, weights=args.weights,
                same_size_batches=args.same_size_batches,
                **overrides)
    print(f"wrote {out}")
    return 0


def _cmd_data_make(args) -> int:
    out = make_dataset(args.kind, Path(args.out), split=args.split, seed=args.seed, size=args.size)
    print("\n".join(summary(out, args.split)))
    print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    import torch

    from zoo.demo import TOLERANCE, check_rows, format_table, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run_demo(Path(args.data_root) if args.data_root else None, args.models or None,
                    batch_size=args.batch_size, progress=True, log=(lambda line: print(line, file=sys.stderr)))
    print(format_table(rows))
    print(f"\n{len({r.model for r in rows})} models in {time.perf_counter() - start:.0f} s")
    if args.check:
        problems = check_rows(rows)
        if problems:
            print("check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"check passed: every reproduced metric is within {TOLERANCE} of the reported one")
    return 0


def _cmd_visualize(args) -> int:
    from zoo.factory import create_model
    from zoo.viz.visualize import visualize

    model = create_model(args.name, pretrained=args.weights is None, weights=args.weights).to(args.device)
    shown = args.weights or split_name(args.name)[1] or model_info(args.name).default_weights  # for the page
    index = visualize(model, args.name, args.out, image=args.image, video=args.video, point=args.point,
                      frame=args.frame, weights=shown)
    print(f"wrote {index}")
    return 0


def _cmd_site(args) -> int:
    from zoo.viz.site import build_site

    print(f"wrote {build_site(args.out, results=args.results)}")
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


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
                                   "(model.safetensors + config.json + README.md). The target model and map are "
                                   "read from what the checkpoint records (DETR/DeiT args, leaderj1001 arch), "
                                   "else found by its key/shape signature among the registered models.")
    p.add_argument("--from", dest="from_map", metavar="MAP",
                   help="conversion map in convert/ (e.g. rga, rsa, irpe-detr, irpe-deit, sasa-leader, torchvision-resnet; "
                        "default: detected)")
    p.add_argument("src", help="original checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="target model name (default: detected; needed only when several fit)")
    p.add_argument("--ema", action="store_true", help="convert the checkpoint's EMA weights (model_ema)")
    p.add_argument("--kwargs", help="JSON constructor kwargs of the target model, e.g. '{\"num_classes\": 751}'")
    p.add_argument("--non-strict", action="store_true", help="report but allow missing/unexpected keys")
    p.add_argument("--trust-map", action="store_true",
                   help="--from is a map file of your own whose hooks may run any Python function (a map is code: "
                        "without this only RelZoo's registered hooks run)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights that hold NaN or inf")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a Hugging Face-ready folder, an ONNX model or a torch.export program",
                       description="--format hf (default): model.safetensors, config.json and a model card for upload "
                                   "to the Hub. onnx: model.onnx (dynamo exporter, opset 18, checked against PyTorch "
                                   "with onnxruntime) and export.json (inputs, outputs, preprocessing). "
                                   "exported-program: model.pt2 (torch.export) and export.json.")
    p.add_argument("name", help="model or model.tag")
    p.add_argument("--format", choices=["hf", "onnx", "exported-program"], default="hf")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", help="weights source (default: the tag's or default weights; random if none)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="onnx / exported-program: H W or C H W of the exported input (default: the preprocessing's "
                        "size; detectors: a square of their resize_shorter)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="onnx / exported-program: a symbolic batch dimension (default: the batch size is fixed to 1)")
    p.add_argument("--repo-id", metavar="ORG/NAME", help="the Hub repo the folder is for (its source and usage line)")
    p.add_argument("--eval-results", metavar="FILE", help="a `zoo eval --out` JSON: its metrics go into the card")
    p.add_argument("--push", metavar="ORG/NAME", help="also upload the folder to this Hub repo (HF_TOKEN, HF_ENDPOINT)")
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
    p.add_argument("--no-progress", dest="quiet", action="store_true", help="the same as --quiet")
    p.set_defaults(quiet=False)
    p.add_argument("--no-plots", action="store_true",
                   help="with --out, do not draw pr_curve.png (COCO) / cmc.png (re-id) beside the JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "train", help="train a model on a dataset (deterministic on CPU)",
        description="Train a registered model from scratch (or fine-tune --weights) with its family's loss "
                    "(set loss for DETR, CE + triplet for re-id, CE for classification and video) on a dataset in "
                    "the format of its eval protocol, and write model.safetensors + config.json + README.md.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--data", required=True, help="dataset root (the train split is read)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="gradient clipping (default: 0.1 for DETR, none otherwise; 0 = off)")
    p.add_argument("--num-instances", type=int, default=4, help="re-id: K images per identity in a batch")
    p.add_argument("--same-size-batches", type=_fraction, default=0.0, metavar="FRACTION",
                   help="detection: this share of each epoch's batches holds images of (nearly) one size, so they "
                        "are not padded; a detector trained only on padded batches depends on the padding (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="train on the first N samples only")
    p.add_argument("--kwargs", help="JSON constructor kwargs over the config's, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--weights", "--init", dest="weights",
                   help="fine-tune these weights (a tag, path, URL or hf://) instead of starting from "
                        "scratch; with --kwargs '{\"num_classes\": N}' the classifier starts new (--init: the same)")
    p.add_argument("--preprocessing", help="JSON overrides of the config's preprocessing, e.g. '{\"input_size\": [64, 32]}'")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--validate", action="store_true",
                   help="after every epoch, evaluate on the val split of --data with the model's protocol "
                        "(metrics per epoch in config.json and metrics.png)")
    p.add_argument("--no-plots", action="store_true", help="do not draw loss.png (and metrics.png) into --out")
    p.set_defaults(func=_cmd_train)

    data = p = sub.add_parser("data", help="generate the synthetic mini datasets",
                              description="Synthetic datasets in the original datasets' on-disk formats.")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = actions.add_parser("make", help="write a synthetic dataset",
                           description="Write a synthetic dataset (deterministic: the same seed gives the same "
                                       "bytes). Kinds: " + "; ".join(f"{k}: {v}" for k, v in SUMMARIES.items()))
    p.add_argument("kind", choices=list(DATASETS))
    p.add_argument("--out", required=True, help="output folder (new, empty, or written before for this kind)")
    p.add_argument("--split", choices=SPLITS, default="all", help="which split(s) to write (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (non-negative, default 0)")
    p.add_argument("--size", choices=SIZES, default="default", help="'tiny' writes tens of samples, for tests")
    p.set_defaults(func=_cmd_data_make)

    p = sub.add_parser(
        "demo", help="generate the mini datasets, evaluate every RelZoo-mini model, print reported vs reproduced",
        description="Generate each RelZoo-mini model's synthetic validation split, load the model by name with its "
                    "committed weights (the normal pretrained path), evaluate it with its family's protocol and print "
                    "one table of reported vs reproduced metrics.")
    p.add_argument("--data-root", help="where the datasets are generated (default: $RELZOO_HOME/demo)")
    p.add_argument("--models", nargs="+", metavar="NAME", help="only these minis (default: all registered)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if any reproduced metric differs from the reported one by more than the demo's "
                        "tolerance (stated with the result)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="the reported numbers were measured at the default (detection numbers vary a little with it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--progress", action="store_true",
                   help="(the default on a terminal now: progress bars show unless --quiet)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "visualize", help="draw a model's attention for one image or video",
        description="Run a model on one input and draw what its attention layers compute (iRPE buckets and "
                    "tables, DETR cross-attention, RGA spatial/channel attention, RSA relational kernels, RPA "
                    "affinities, SASA local attention) as PNGs with an index.html.")
    p.add_argument("name", help="model or model.tag")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file (models that take images)")
    source.add_argument("--video", help="a folder of video frames img_00001.jpg, ... (RSA models)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier visualisation)")
    p.add_argument("--weights", help="weights source overriding the tag (tag, path, URL, hf://)")
    p.add_argument("--point", nargs=2, type=_fraction, default=(0.5, 0.5), metavar=("ROW", "COL"),
                   help="the query / position / pixel shown, as fractions of the input's height and width "
                        "(default 0.5 0.5, the centre)")
    p.add_argument("--frame", type=int, help="RSA: the frame of the position (default the middle one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser(
        "site", help="write the zoo as a static HTML site",
        description="Write a static site (plain HTML + CSS, opens from the file system): the model table with "
                    "filters by family and task, and one page per model with its card, reported vs reproduced "
                    "metrics, the commands that reproduce them, its plots and visualisations.")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier site)")
    p.add_argument("--results", help="a folder searched for `zoo eval --out` results (and the plots beside them) "
                                      "and `zoo visualize --out` folders")
    p.set_defaults(func=_cmd_site)
    for command in [*sub.choices.values(), *actions.choices.values()]:
        if command is not data:  # `data` only holds its actions
            command.add_argument("--quiet", action="store_true",
                                 help="no progress bars (shown by default on a terminal, on stderr)")
            command.add_argument("--debug", action="store_true",
                                 help="on an error, print the whole message and the traceback (default: one line)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        disable_progress_bars()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        reported = isinstance(exc, (ZooError, FileNotFoundError))  # what RelZoo reports on purpose
        if getattr(args, "debug", False):
            traceback.print_exc()
        else:
            print(_one_line(exc, reported), file=sys.stderr)
        return 2 if reported else 1


def _one_line(exc: BaseException, reported: bool) -> str:
    """The error as one line: its message's first line, and where the rest is."""
    text = first_line(exc)
    if not reported:
        return f"error: {type(exc).__name__}: {text} (a bug in RelZoo; --debug shows the traceback)"
    more = len([line for line in str(exc).splitlines() if line.strip()]) - 1
    return f"error: {text}" + (f" ({more} more lines: --debug)" if more > 0 else "")


if __name__ == "__main__":
    raise SystemExit(main())
