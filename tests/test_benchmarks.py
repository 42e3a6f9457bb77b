"""The benchmark scripts (not run here: minutes each) still start: their imports resolve.

A helper removed from overhead.py once left scale.py failing at import for a week unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# nf_runner.py's own half runs inside NeuralForecast's virtual environment, which the
# accuracy and speed scripts create; their imports of its host half are checked with them.
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in ("nf_runner.py", "results.py"))


def test_every_script_is_listed() -> None:
    assert {"accuracy.py", "training_speed.py", "overhead.py", "write_speed.py", "scale.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
