"""What each benchmark returns, and the Markdown the runner writes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Check:
    """A target: ``value`` (a ratio measured in this run) against ``target``."""

    name: str
    value: float
    target: float
    higher_is_better: bool = True
    unit: str = "x"
    """How the value and target print: ``x`` for ratios, `` ms`` for latencies."""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def markdown_row(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        return (f"| {self.name} | {self.value:.2f}{self.unit} | "
                f"{sign} {self.target:g}{self.unit} | {'met' if self.met else '**missed**'} |")


@dataclass
class Section:
    key: str
    title: str
    intro: str
    header: list[str]
    rows: list[list[str]]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def markdown(self, level: int = 3) -> str:
        parts = [f"{'#' * level} {self.title}", "", self.intro]
        if self.header:
            parts += ["", self.table()]
        if self.notes:
            parts += [""] + [f"* {note}" for note in self.notes]
        if self.checks:
            parts += ["", "| target | measured | wanted | |", "|---|---|---|---|"]
            parts += [check.markdown_row() for check in self.checks]
        return "\n".join(parts)
