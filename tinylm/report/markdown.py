"""Markdown building blocks for the report: tables, code blocks, escaped cells, readable numbers."""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~&])")


def escape(text: str) -> str:
    """Text for a table cell: markdown punctuation escaped (a `|` would end the cell), newlines as <br>."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\r\n", "\n").replace("\n", "<br>")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> list[str]:
    """A pipe table; columns from `numeric_from` on are right-aligned (they hold numbers)."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return lines + [""]


def code_block(text: str) -> list[str]:
    """Verbatim text in a fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence, ""]


def shown_token(token: str) -> str:
    """A token in a code span, its spaces visible as ␣ (leading spaces are part of BPE tokens)."""
    return "`" + token.replace(" ", "␣").replace("`", "'").replace("|", "\\|") + "`"


def number(value: float, digits: int = 3) -> str:
    return f"{value:,.{digits}f}"


def count(value: int) -> str:
    return f"{value:,}"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def short(value: float) -> str:
    """A large count in a sentence: 1,234,567 -> 1.23M."""
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


class Report:
    """Markdown lines and the figures they link, built section by section."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.figures: dict[str, Figure] = {}

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, name: str, fig: Figure, alt: str) -> None:
        self.figures[f"{name}.png"] = fig
        self.add(f"![{alt}](figures/{name}.png)", "")

    def markdown(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"
