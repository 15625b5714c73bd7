"""experiments/reproduce_paper.py at its quick preset, run once per test session
(`quick_reproduction` in conftest.py): tests/test_reproduce_paper.py checks its tables and
tests/test_notebook.py executes the analysis notebook on its results folder."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce_paper.py"
SEEDS = (0, 1)
# Every variant of the script's default set, and no_kl (trusted_reward and answer_rejections,
# one-seed probes, are left out to keep the suite's time: tests/test_rewards.py and
# tests/test_agent_loop.py test what they change).
VARIANTS = (
    "full",
    "no_reasoning",
    "no_thinking",
    "exact_only",
    "fixed_weight",
    "matched_reward",
    "live_tools",
    "no_kl",
    "sft_only",
)


def run(workdir: Path, out: Path, compile_cache: Path) -> tuple[dict, str]:
    """Runs (or resumes) the quick preset over SEEDS; returns its last JSON line and stdout."""
    command = [sys.executable, str(SCRIPT), "--preset", "quick", "--seeds", *map(str, SEEDS)]
    command += ["--variants", *VARIANTS]
    command += ["--workdir", str(workdir), "--out", str(out), "--compile-cache", str(compile_cache)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout
