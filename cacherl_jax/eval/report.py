"""Results tables: accuracy and entry count per category and overall, as Markdown and JSON.

Takes anything with `category`, `valid` and `kind` attributes (BFCL `Verdict`s). "overall" pools
all entries; "category mean" averages the category accuracies, so a large category does not
drown the small ones (BFCL's own summary averages categories too, with its own grouping).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol


class ScoredEntry(Protocol):
    category: str
    valid: bool
    kind: str


@dataclasses.dataclass(frozen=True)
class CategoryResult:
    """Correct entries out of `count` for one category (or for all: "overall")."""

    category: str
    correct: int
    count: int
    failures: dict[str, int]  # failure kind -> entries

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


@dataclasses.dataclass(frozen=True)
class Results:
    categories: list[CategoryResult]  # in order of first appearance
    overall: CategoryResult

    @property
    def category_mean(self) -> float:
        if not self.categories:
            return 0.0
        return sum(result.accuracy for result in self.categories) / len(self.categories)


def summarize(verdicts: Iterable[ScoredEntry]) -> Results:
    """Per-category and overall counts of the given verdicts."""
    correct: Counter[str] = Counter()
    count: Counter[str] = Counter()
    failures: dict[str, Counter[str]] = {}
    for verdict in verdicts:
        count[verdict.category] += 1
        failures.setdefault(verdict.category, Counter())
        if verdict.valid:
            correct[verdict.category] += 1
        else:
            failures[verdict.category][verdict.kind] += 1
    categories = [
        CategoryResult(name, correct[name], count[name], dict(failures[name].most_common()))
        for name in count
    ]
    all_failures: Counter[str] = Counter()
    for kinds in failures.values():
        all_failures.update(kinds)
    overall = CategoryResult(
        "overall", sum(correct.values()), sum(count.values()), dict(all_failures.most_common())
    )
    return Results(categories, overall)


def to_json(results: Results) -> dict[str, Any]:
    """Plain data: per category and overall accuracy, correct, count and failure kinds."""

    def row(result: CategoryResult) -> dict[str, Any]:
        return {
            "accuracy": round(result.accuracy, 6),
            "correct": result.correct,
            "count": result.count,
            "failures": result.failures,
        }

    return {
        "categories": {result.category: row(result) for result in results.categories},
        "overall": row(results.overall),
        "category_mean_accuracy": round(results.category_mean, 6),
    }


def render_markdown(results: Results, title: str | None = None) -> str:
    """A Markdown table: one row per category, then overall and the category mean."""
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| category | accuracy | correct | entries | most common failure |",
        "|---|---:|---:|---:|---|",
    ]

    def row(result: CategoryResult, name: str) -> str:
        failure = next(iter(result.failures.items()), None)
        common = f"{failure[0]} ({failure[1]})" if failure else ""
        return (
            f"| {name} | {100 * result.accuracy:.1f}% | {result.correct} | {result.count} "
            f"| {common} |"
        )

    lines += [row(result, result.category) for result in results.categories]
    lines.append(row(results.overall, "**overall**"))
    lines.append(
        f"| category mean | {100 * results.category_mean:.1f}% | | {len(results.categories)} "
        "categories | |"
    )
    return "\n".join(lines) + "\n"


def write_report(
    results: Results, directory: str | Path, stem: str = "bfcl", title: str | None = None
) -> tuple[Path, Path]:
    """Writes `<stem>.md` and `<stem>.json` into `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    markdown_path.write_text(render_markdown(results, title), encoding="utf-8")
    json_path.write_text(json.dumps(to_json(results), indent=2) + "\n", encoding="utf-8")
    return markdown_path, json_path
