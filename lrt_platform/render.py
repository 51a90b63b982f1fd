"""Text renderings shared by the planner's dry run, compare's report and the sweep's progress lines: the SI
number format and the table renderers (aligned text, markdown, HTML, CSV).

Design choices:
- One unit convention: SI prefixes k, M, G, T, P, E (powers of 1000) with 3
  significant digits by default, for parameters, tokens and FLOPs alike;
  None renders as "n/a".
- Tables are a header and rows of cells the caller has already formatted
  (CSV: any values; csv.writer writes None as an empty cell). A text table's
  columns are as wide as their widest cell, separated by two spaces, with no
  trailing blanks.
- Standard library only: compare stays free of torch and matplotlib, and
  nothing here imports another lrt_platform module.

Example:
    >>> si(1_234_567), si(2.5e9), si(6e17), si(999), si(None)
    ('1.23M', '2.5G', '600P', '999', 'n/a')
    >>> print("\\n".join(text_table(["arm", "tokens"], [["baseline", si(2e9)], ["lrt", si(1e9)]])))
    arm       tokens
    --------  ------
    baseline  2G
    lrt       1G
    >>> csv_text(["arm", "n"], [["lrt", 3], ["baseline", None]]).splitlines()
    ['arm,n', 'lrt,3', 'baseline,']
"""

from __future__ import annotations

import csv
import html
import io
from typing import Callable

SI_UNITS = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def si(x: float | None, sig: int = 3) -> str:
    """`x` with an SI prefix and `sig` significant digits: 1.23M, 4.5G; "n/a" for None."""
    if x is None:
        return "n/a"
    for unit, scale in SI_UNITS:
        if abs(x) >= scale:
            return f"{x / scale:.{sig}g}{unit}"
    return f"{x:.{sig}g}"


def aligned(cols: list[str], rows: list[list[str]]) -> tuple[Callable[[list[str]], str], str]:
    """(line renderer, rule line) for a text table whose columns are as wide as their widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    return (lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()), \
        "  ".join("-" * w for w in widths)


def text_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    """The header, a rule and the rows, aligned, one string per line."""
    line, rule = aligned(cols, rows)
    return [line(cols), rule, *map(line, rows)]


def markdown_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table, one string per line (cells are not escaped)."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]


def html_table(cols: list[str], rows: list[list[str]]) -> str:
    """A <table> with one header row; every cell HTML-escaped."""
    cell = lambda tag, text: f"<{tag}>{html.escape(text)}</{tag}>"  # noqa: E731
    body = ["<tr>" + "".join(cell("th", c) for c in cols) + "</tr>"]
    body += ["<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows]
    return f"<table>{''.join(body)}</table>"


def csv_text(cols: list[str], rows: list[list]) -> str:
    """CSV (csv.writer's dialect: \\r\\n line ends, None as an empty cell) with a header line."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    w.writerows(rows)
    return buf.getvalue()
