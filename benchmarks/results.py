"""Shared by the benchmark scripts: the machine they ran on, and a dated section in RESULTS.md.

Every script prints its table and then calls `append_section`, so RESULTS.md keeps the history
of what was measured, where and with which command (these machines are noisy: a ratio measured
within one run is the figure to quote, not a lone absolute time).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line: CPU count and vector unit, Python, torch and the git commit measured."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent, check=False).stdout.strip() or "?"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".."],
                                 capture_output=True, text=True, cwd=RESULTS.parent, check=False).stdout
        if any(not line.endswith("RESULTS.md") for line in changed.splitlines()):
            commit += " + uncommitted changes"  # what ran is not exactly that commit
    except OSError:
        commit = "?"
    # Sessions land on different CPUs; whether bfloat16 products are native (avx512_bf16, AMX)
    # decides what `precision: auto` trains in and how fast, so every section names it.
    from forecasting.train import cpu_has_native_bf16

    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 unknown"}[cpu_has_native_bf16()]
    from forecasting.machine_probes import cpu_model

    return (f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.machine()} "
            f"({torch.backends.cpu.get_cpu_capability()}, {bf16}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, commit {commit}")


def append_section(title: str, table: pd.DataFrame | str, *, notes: list[str] | None = None) -> None:
    """Append '## <UTC date> <title>' with the command, the machine, the table and notes."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = table if isinstance(table, str) else table.to_markdown(floatfmt=".3f")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    lines = [f"## {stamp} — {title}", "", f"`{command}` on {machine()}", "", body, ""]
    lines += [f"- {note}" for note in notes or []]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script that measured it.\n\n")
    with RESULTS.open("a") as out:
        out.write("\n".join(lines).rstrip() + "\n\n")
