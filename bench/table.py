"""The benchmark table: one `Row` per figure, printed by `table` (every bench script's format)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One line of the table: a figure, its same-run baseline, their ratio and the target."""

    figure: str
    value: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: no target to meet


def table(rows: list[Row]) -> str:
    """A Markdown table of `rows` with a header; "met"/"MISSED" where a target applies."""
    head = Row("figure", "value", "baseline (same run)", "ratio", "target", None)
    cells = [[r.figure, r.value, r.baseline, r.ratio, r.target,
              "" if r.met is None else ("met" if r.met else "MISSED")] for r in [head, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(6)) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
