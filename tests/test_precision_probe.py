"""`precision: auto` asks the CPU whether bf16-mixed trains faster, once per machine."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from forecasting import fused_cells, precision_probe


@pytest.fixture
def probe(tmp_path, monkeypatch) -> Iterator[None]:
    """The probe with its own cache directory and nothing remembered in this process."""
    fused_cells.library()  # loaded from the usual cache first: built here, it would be built again
    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(tmp_path))
    precision_probe.bf16_trains_faster.cache_clear()
    yield
    precision_probe.bf16_trains_faster.cache_clear()


def answers_file(tmp_path) -> dict:
    return json.loads((tmp_path / precision_probe.CACHE_FILE).read_text())


@pytest.mark.usefixtures("probe")
@pytest.mark.parametrize(("float32_s", "bf16_s", "expected"), [
    (0.030, 0.020, True),    # an AMD EPYC with avx512_bf16: 1.4x faster
    (0.030, 0.0285, False),  # 5% faster: within the noise, float32 is the exact one
    (0.024, 0.027, False),   # an Intel Xeon with AMX: slower
])
def test_bf16_mixed_only_when_its_steps_are_clearly_faster(float32_s, bf16_s, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_probe, "measure", lambda: (float32_s, bf16_s))
    assert precision_probe.bf16_trains_faster() is expected
    [(key, answer)] = answers_file(tmp_path).items()
    assert key == precision_probe._machine_key()
    assert answer["bf16_mixed_faster"] is expected
    assert (answer["float32_s"], answer["bf16_mixed_s"]) == (float32_s, bf16_s)


@pytest.mark.usefixtures("probe")
def test_a_machine_measures_once_and_later_processes_read_its_answer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(precision_probe, "measure", lambda: calls.append(1) or (0.03, 0.02))
    assert precision_probe.bf16_trains_faster() is True
    precision_probe.bf16_trains_faster.cache_clear()  # as a new process would start

    def must_not_measure():
        raise AssertionError("measured again although the answer was kept")

    monkeypatch.setattr(precision_probe, "measure", must_not_measure)
    assert precision_probe.bf16_trains_faster() is True
    assert len(calls) == 1


@pytest.mark.usefixtures("probe")
def test_an_answer_for_other_conditions_is_kept_and_not_used(tmp_path, monkeypatch):
    """An answer is for the conditions it was measured in; a file of others' is kept, not used."""
    (tmp_path / precision_probe.CACHE_FILE).write_text(json.dumps({"other CPU|torch 1.0": {"bf16_mixed_faster": True}}))
    monkeypatch.setattr(precision_probe, "measure", lambda: (0.02, 0.03))
    assert precision_probe.bf16_trains_faster() is False
    assert set(answers_file(tmp_path)) == {"other CPU|torch 1.0", precision_probe._machine_key()}


@pytest.mark.usefixtures("probe")
def test_an_unreadable_answer_is_measured_again_and_replaced(tmp_path, monkeypatch):
    (tmp_path / precision_probe.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(precision_probe, "measure", lambda: (0.03, 0.02))
    assert precision_probe.bf16_trains_faster() is True
    assert answers_file(tmp_path)[precision_probe._machine_key()]["bf16_mixed_faster"] is True


@pytest.mark.usefixtures("probe")
def test_where_no_answer_can_be_kept_auto_takes_float32_unmeasured(tmp_path, monkeypatch, caplog):
    """Each process would measure for itself, and two of one night could train differently."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(blocked / "cache"))  # under a file: cannot be made

    def must_not_measure():
        raise AssertionError("measured although no other process could read the answer")

    monkeypatch.setattr(precision_probe, "measure", must_not_measure)
    with caplog.at_level("WARNING", logger="forecasting.precision_probe"):
        assert precision_probe.bf16_trains_faster() is False
    assert "float32, unmeasured: the precision probe's answer cannot be kept" in caplog.text


def test_the_probe_times_real_training_steps_and_leaves_torch_s_draws_alone():
    """The measurement itself: an LSTM's and a GRU's forward, backward and Adam step, each
    precision through its own kernel path (bf16-mixed emulated where the CPU lacks it). Its
    networks draw their weights from torch's generator, which a night had just seeded for the
    network it trains next: that network's draws must be what they are without the probe."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    threads = torch.get_num_threads()
    torch.manual_seed(3)
    float32_s, bf16_s = precision_probe.measure()
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_num_threads() == threads  # measured on one thread, then given back
    assert 0 < float32_s < 60 and math.isfinite(float32_s)
    assert 0 < bf16_s < 60 and math.isfinite(bf16_s)


def test_processes_asking_at_once_wait_for_one_measurement(tmp_path):
    """Dask or xdist workers starting together: one measures, the rest read its answer, so that
    they all train in the same precision."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    measured = tmp_path / "measured"
    go = tmp_path / "go"
    # Each asker imports torch first (seconds, unevenly), then waits for the others: all ask at once
    asker = ("import os, pathlib, time\n"
             "from forecasting import precision_probe as probe\n"
             "def measure():\n"
             f"    with open({str(measured)!r}, 'a') as log: log.write('x')\n"
             "    time.sleep(1.5)\n"
             "    return 0.03, 0.02\n"
             "probe.measure = measure\n"
             f"pathlib.Path({str(tmp_path)!r}, 'ready-' + str(os.getpid())).touch()\n"
             f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
             "print(probe.bf16_trains_faster())\n")
    env = {**os.environ, "FORECASTING_CACHE_DIR": str(tmp_path / "cache"), "FORECASTING_FUSED_CELLS": "0"}
    root = Path(__file__).resolve().parent.parent
    askers = [subprocess.Popen([sys.executable, "-c", asker], env=env, cwd=root, stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        assert all(process.poll() is None for process in askers), "an asker ended before asking"
        time.sleep(0.05)
    go.touch()
    answers = [process.communicate(timeout=120)[0].strip() for process in askers]
    assert [process.returncode for process in askers] == [0, 0, 0]
    assert answers == ["True"] * 3
    assert measured.read_text() == "x"  # one measurement
