"""Regenerate README.md's generated tables (``--check`` fails when one is stale).

- ``model-table``: every registered model, from the registry and ``configs/``;
- ``env-table``: every environment variable RelZoo reads, from ``zoo.paths.ENVIRONMENT``;
- ``export-table``: which model exports to what, from ``docs/export_support.json``, which
  ``pytest tests/test_export.py --export-table docs/export_support.json`` writes (the minis and one
  full-size model per family).

Each sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers.

    python scripts/model_table.py          # rewrite README.md
    python scripts/model_table.py --check  # exit 1 if README.md differs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's registry, not another installed copy of zoo

import zoo  # noqa: E402
from zoo.paths import environment_table  # noqa: E402

README = REPO / "README.md"
EXPORT_SUPPORT = REPO / "docs" / "export_support.json"


def model_table() -> str:
    lines = ["| model | family | task | weights | reported |", "|---|---|---|---|---|"]
    for name in zoo.list_models():
        cfg = zoo.model_info(name)
        tags = ", ".join(f"`{t}`" for t in cfg.weights) or "none published"
        shown = cfg.reported_for(None)[:3]
        reported = "; ".join(f"{r.metric} {r.value:g} ({r.dataset})" for r in shown) or "-"
        lines.append(f"| `{name}` | {cfg.family} | {cfg.task} | {tags} | {reported} |")
    return "\n".join(lines)


def export_table() -> str:
    rows = json.loads(EXPORT_SUPPORT.read_text(encoding="utf-8"))
    lines = ["| model | weights | input | torch.export | ONNX + onnxruntime (max abs diff) | torch.compile | "
             "bf16 autocast (cosine) | memory format |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        onnx = row["onnx"]
        diff = "runs; random weights: near-tied detections" if onnx["max_abs_diff"] is None else \
            f"{onnx['max_abs_diff']:.0e}"
        lines.append(f"| `{name}` | {row['weights']} | {' x '.join(map(str, row['input']))} | {row['torch.export']} | "
                     f"opset {onnx['opset']}, dynamic batch ({diff}) | {row['torch.compile']} | "
                     f"{row['bf16_autocast_cosine']:.5f} | `{row['memory_format']}` |")
    return "\n".join(lines)


TABLES = {"model-table": model_table, "env-table": environment_table, "export-table": export_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, sep, rest = text.partition(begin)
        if not sep or end not in rest:
            raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
        text = f"{head}{begin}\n{make()}\n{end}{rest.split(end, 1)[1]}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's generated tables are stale: run python scripts/model_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
