"""Regenerate the model table in README.md from the registry (``--check`` fails when it is stale).

    python scripts/model_table.py          # rewrite README.md
    python scripts/model_table.py --check  # exit 1 if README.md differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zoo

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


def model_table() -> str:
    lines = ["| model | family | task | weights | reported |", "|---|---|---|---|---|"]
    for name in zoo.list_models():
        cfg = zoo.model_info(name)
        tags = ", ".join(f"`{t}`" for t in cfg.weights) or "none published"
        shown = cfg.reported_for(None)[:3]
        reported = "; ".join(f"{r.metric} {r.value:g} ({r.dataset})" for r in shown) or "-"
        lines.append(f"| `{name}` | {cfg.family} | {cfg.task} | {tags} | {reported} |")
    return "\n".join(lines)


def render(text: str) -> str:
    head, sep, rest = text.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{model_table()}\n{END}{rest.split(END, 1)[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md model table is stale: run python scripts/model_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
