"""The HTML both static outputs share (``zoo visualize``'s index.html and ``zoo site``'s pages): one page
skeleton, one style sheet, escaping. Plain HTML and CSS that work from the file system; no script.
"""
from __future__ import annotations

from html import escape
from typing import Iterable, Optional, Sequence

__all__ = ["STYLE", "page", "escape", "table", "figure", "code_block"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #1f2328; background: #ffffff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
a { color: #0969da; } code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem; }
pre { background: #f6f8fa; padding: 0.6rem 0.8rem; border-radius: 6px; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 0.9rem; color: #57606a; margin-top: 0.3rem; max-width: 60rem; }
.muted { color: #57606a; } .bad { color: #cf222e; } .good { color: #1a7f37; }
.filters { margin: 1rem 0; } .filters div { margin: 0.3rem 0; } input.filter { display: none; }
h1 code { font-size: inherit; }
.filters label { display: inline-block; border: 1px solid #d0d7de; border-radius: 1rem; padding: 0.1rem 0.7rem;
                 margin: 0.1rem; cursor: pointer; font-size: 0.85rem; background: #f6f8fa; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; } dt { font-weight: 600; } dd { margin: 0; }
"""


def page(title: str, body: str, *, css: Optional[str] = None, extra_style: str = "") -> str:
    """A complete HTML5 page. ``css``: relative link to a style sheet (else :data:`STYLE` inline)."""
    style = f'<link rel="stylesheet" href="{escape(css)}">' if css else f"<style>{STYLE}</style>"
    if extra_style:
        style += f"\n<style>{extra_style}</style>"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n{style}\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, row_attrs: Optional[Sequence[str]] = None,
          numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are HTML already (escape text first); ``row_attrs``: attributes per body row."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = f" {row_attrs[i]}" if row_attrs else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def figure(src: str, title: str, caption: str = "") -> str:
    """An image with its title and caption (text, escaped here)."""
    return (f'<figure><img src="{escape(src)}" alt="{escape(title)}" loading="eager">'
            f"<figcaption><strong>{escape(title)}</strong>" + (f". {escape(caption)}" if caption else "")
            + "</figcaption></figure>")


def code_block(lines: Sequence[str]) -> str:
    return "<pre><code>" + escape("\n".join(lines)) + "</code></pre>"
