"""notebooks/analyze_run.ipynb executes top to bottom, with inline figures, on the results
folder of a real small run (experiments/reproduce_paper.py at its quick preset, shared with
tests/test_reproduce_paper.py: every variant, two seeds, per-step metrics and validation records),
and on the committed results."""

import json
import shutil
import statistics
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from quick_reproduction import SEEDS

from cacherl_jax.eval.taxonomy import BUCKETS, read_validation_records

# Whole trainers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "analyze_run.ipynb"
VARIANTS = {"full": "cache", "live_tools": "live"}


def _timing_row(mode: str, metrics: list[dict]) -> dict:
    steps = [m for m in metrics if "time/sampling_s" in m]
    row = {"mode": mode, "tool_latency_s": 0.0}
    for phase in ("sampling", "tools", "update"):
        row[f"{phase}_s"] = statistics.fmean(m[f"time/{phase}_s"] for m in steps)
    return row


@pytest.fixture(scope="module")
def results_dir(quick_reproduction, tmp_path_factory):
    """The quick reproduction's results folder, plus cache_vs_live_timing.json made from its
    cache and live GRPO runs' step times (the benchmark that writes it is not run here)."""
    results = tmp_path_factory.mktemp("notebook") / "results"
    shutil.copytree(quick_reproduction[1], results)
    timing = []
    for variant, mode in VARIANTS.items():
        path = results / "runs" / f"seed{SEEDS[0]}" / variant / "grpo_metrics.jsonl"
        metrics = [json.loads(line) for line in path.read_text().splitlines()]
        timing.append(_timing_row(mode, metrics))
    (results / "cache_vs_live_timing.json").write_text(json.dumps({"rows": timing}))
    return results


def _execute(monkeypatch, results_dir: Path | None) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, 4)
    if results_dir is None:
        monkeypatch.delenv("RESULTS_DIR", raising=False)
    else:
        monkeypatch.setenv("RESULTS_DIR", str(results_dir))
    # Run from notebooks/, as Jupyter does: the default RESULTS_DIR is ../experiments/results.
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOK.parent}},
    )
    client.execute()
    return notebook


def _outputs(notebook, output_type=None):
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output_type is None or output.get("output_type") == output_type
    ]


def _text(notebook) -> str:
    parts = []
    for output in _outputs(notebook):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def test_notebook_plots_a_results_folder_inline(results_dir, monkeypatch):
    notebook = _execute(monkeypatch, results_dir)
    assert not _outputs(notebook, "error")
    source = "\n".join(cell.source for cell in notebook.cells)
    assert "%matplotlib inline" in source and "matplotlib.use(" not in source
    images = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
    # Stages, GRPO curves, tiers by step, cache vs live (paired, timing), the taxonomy.
    assert len(images) >= 6, len(images)
    text = _text(notebook)
    for missing in ("no grpo_metrics", "no validation_", "no cache_vs_live", "no paired"):
        assert missing not in text, missing
    # The taxonomy table holds each run's bucket counts, as the records say.
    for variant in VARIANTS:
        for stage in ("sft", "grpo"):
            records = [
                record
                for seed in SEEDS
                for record in read_validation_records(
                    results_dir / "runs" / f"seed{seed}" / variant / f"validation_{stage}.jsonl"
                )
            ]  # the table counts every seed's tasks
            counts = [sum(r["failure"] == bucket for r in records) for bucket in BUCKETS]
            successes = sum(r["success"] for r in records)
            row = f"| {variant} | {stage} | {len(records)} | {successes} | "
            assert row + " | ".join(map(str, counts)) + " |" in text


def test_notebook_runs_on_the_committed_results(monkeypatch):
    """From notebooks/ without RESULTS_DIR it reads ../experiments/results; sections whose files
    are not there say so instead of failing."""
    notebook = _execute(monkeypatch, None)
    assert not _outputs(notebook, "error")
    text = _text(notebook)
    assert "RESULTS_DIR = ../experiments/results" in text
    committed = json.loads((NOTEBOOK.parents[1] / "experiments/results/results.json").read_text())
    seeds = len(committed["seeds"])
    assert f"| full | sft | {seeds} |" in text  # the stage table: one row per stage, n = seeds
