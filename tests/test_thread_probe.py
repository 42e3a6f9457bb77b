"""Each network trains on the fewest of the process's threads that train it fastest, measured
once per machine and shape (forecasting.thread_probe)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

from forecasting import fused_cells, thread_probe, train
from forecasting.config import TrainingConfig
from forecasting.models import NetConfig, RecurrentNet

SALES = NetConfig(cell="gru", input_size=3, hidden_size=64, horizon=12, season_length=12)


@pytest.fixture
def probe(tmp_path, monkeypatch) -> Iterator[None]:
    """Two torch threads to choose from, no pinned count, its own cache directory and nothing
    remembered in this process."""
    fused_cells.library()  # loaded from the usual cache first: built here, it would be built again
    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite's workers pin theirs
    monkeypatch.setattr(thread_probe, "_pinned", False)  # and so may a test before this one
    for name in thread_probe.WAIT_SETTINGS:  # part of the key: as the package leaves them
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    thread_probe._answers.clear()
    yield
    thread_probe._answers.clear()
    torch.set_num_threads(threads)


def ask(config: NetConfig = SALES) -> int:
    return thread_probe.training_threads(config, batch_size=512, input_window=36, precision="float32")


def kept(tmp_path) -> dict:
    return json.loads((tmp_path / thread_probe.CACHE_FILE).read_text())


@pytest.mark.parametrize(("available", "counts"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_the_counts_compared_double_up_to_what_the_process_has(available, counts):
    assert thread_probe.thread_counts(available) == counts


@pytest.mark.parametrize(("seconds", "expected"), [
    ({1: 0.009, 2: 0.020}, 1),                # the AMD EPYC's sales RNN: a second thread only costs
    ({1: 0.030, 2: 0.0285}, 1),               # 5% faster: within the noise, the core is left free
    ({1: 0.030, 2: 0.027}, 2),                # 10% faster: taken
    ({1: 0.034, 2: 0.022}, 2),                # hidden 256: clearly faster
    ({1: 0.040, 2: 0.020, 4: 0.019}, 2),      # 4 gain 5% over 2: 2
    ({1: 0.040, 2: 0.038, 4: 0.020}, 4),      # 2 gain nothing, 4 do
])
def test_more_threads_only_where_they_are_clearly_faster(seconds, expected):
    assert thread_probe.fewest_clearly_fastest(seconds) == expected


@pytest.mark.usefixtures("probe")
def test_a_shape_is_measured_once_and_later_processes_read_its_answer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(thread_probe, "measure", lambda *a, **k: calls.append(k["counts"]) or {1: 0.009, 2: 0.020})
    assert ask() == 1
    assert ask() == 1  # this process: from memory
    thread_probe._answers.clear()  # as a new process would start
    assert ask() == 1  # from the file
    assert calls == [[1, 2]]
    [(key, answer)] = kept(tmp_path).items()
    assert answer["threads"] == 1 and answer["seconds"] == {"1": 0.009, "2": 0.020}
    assert "cell=gru" in key and "batch 512" in key and "window 36" in key and "float32" in key


@pytest.mark.usefixtures("probe")
def test_another_shape_is_measured_for_itself(tmp_path, monkeypatch):
    """A network four times as wide may gain from the second thread that a small one loses on."""
    wide = NetConfig(cell="gru", input_size=3, hidden_size=256, horizon=12, season_length=12)
    monkeypatch.setattr(thread_probe, "measure",
                        lambda config, **k: {1: 0.25, 2: 0.17} if config.hidden_size == 256 else {1: 0.02, 2: 0.03})
    assert (ask(SALES), ask(wide)) == (1, 2)
    assert sorted(answer["threads"] for answer in kept(tmp_path).values()) == [1, 2]


@pytest.mark.usefixtures("probe")
@pytest.mark.parametrize("pinned", ["OMP_NUM_THREADS", "configure_torch_threads(3)", "one thread"])
def test_a_pinned_count_or_a_single_thread_is_taken_as_it_is(pinned, monkeypatch, caplog):
    """OMP_NUM_THREADS is the user's (or Dask's nanny's) count, and so is configure_torch_threads's
    when a count is given; one thread leaves nothing to choose."""
    if pinned == "OMP_NUM_THREADS":
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
    elif pinned == "configure_torch_threads(3)":
        train.configure_torch_threads(3)
    else:
        torch.set_num_threads(1)
    calls = []
    monkeypatch.setattr(thread_probe, "measure", lambda *a, **k: calls.append(1) or {1: 0.01, 3: 0.02})
    with caplog.at_level("WARNING", logger="forecasting.thread_probe"):
        assert ask() == torch.get_num_threads() == (1 if pinned == "one thread" else 3)
    assert calls == [] and not caplog.records and not thread_probe._answers


@pytest.mark.usefixtures("probe")
def test_where_no_answer_can_be_kept_the_process_s_threads_unmeasured(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(blocked / "cache"))  # under a file: cannot be made
    calls = []
    monkeypatch.setattr(thread_probe, "measure", lambda *a, **k: calls.append(1) or {1: 0.01, 2: 0.02})
    with caplog.at_level("WARNING", logger="forecasting.thread_probe"):
        assert ask() == 2
    assert calls == []  # measured, it would have been this process's answer alone
    assert "training threads for gru: 2, unmeasured:" in caplog.text and str(blocked) in caplog.text


@pytest.mark.usefixtures("probe")
@pytest.mark.parametrize("broken", ["a failed measurement", "a kept answer of another count"])
def test_a_probe_that_fails_costs_a_warning_not_the_night(broken, tmp_path, monkeypatch, caplog):
    """A speed-up must not fail a fit: the process's threads, for every fit of that shape in this
    process (one warning; none asks again, or waits again for a lock that timed out)."""
    calls = []
    if broken == "a failed measurement":
        def measure(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("out of memory at this batch")
        monkeypatch.setattr(thread_probe, "measure", measure)
    else:
        key = thread_probe._key(SALES, batch_size=512, input_window=36, precision="float32", counts=[1, 2])
        (tmp_path / thread_probe.CACHE_FILE).write_text(json.dumps({key: {"threads": 8}}))
    with caplog.at_level("WARNING", logger="forecasting.thread_probe"):
        assert ask() == 2
        assert ask() == 2
    assert len(caplog.records) == 1 and "training threads for gru: 2, unmeasured:" in caplog.text
    assert calls == ([1] if broken == "a failed measurement" else [])


@pytest.mark.usefixtures("probe")
def test_the_wait_policy_is_part_of_the_shape_s_conditions(monkeypatch):
    """Spinning threads may win where sleeping ones lose (the Intel Xeon's LSTM, 2026-12-08)."""
    monkeypatch.setattr(thread_probe, "measure", lambda *a, **k: {1: 0.020, 2: 0.030})
    assert ask() == 1
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    monkeypatch.setattr(thread_probe, "measure", lambda *a, **k: {1: 0.020, 2: 0.012})
    assert ask() == 2


@pytest.mark.usefixtures("probe")
def test_a_night_asks_up_front_for_the_shapes_its_networks_then_train_at(monkeypatch):
    """The flow asks before its MLflow process starts; the candidates' fits then find those
    answers (same keys): nothing is measured while they train."""
    from forecasting import pipeline
    from tests.flow_fixtures import synthetic_sales, tiny_config

    measured, trained_on = [], []
    monkeypatch.setattr(thread_probe, "measure",
                        lambda config, **k: measured.append(config.cell) or {1: 0.010, 2: 0.020})
    config = tiny_config(training={"max_epochs": 2, "hidden_size": 8, "batch_size": 32, "ensemble": 1,
                                   "device": "cpu", "precision": "float32"})
    assert pipeline.ask_training_threads(config) == {"rnn": 1, "lstm": 1, "gru": 1}
    assert sorted(measured) == ["gru", "lstm", "rnn"]
    panel = synthetic_sales().rename(columns={"month": "ts", "turnover": "value"})[["series_id", "ts", "value"]]
    panel["ts"] = pd.to_datetime(panel["ts"])
    for name in ("rnn", "lstm", "gru"):
        pipeline.backtest_candidate(config, panel, name,
                                    on_epoch=lambda *a: trained_on.append(torch.get_num_threads()))
    assert sorted(measured) == ["gru", "lstm", "rnn"]  # no more measurements
    assert trained_on and set(trained_on) == {1}


@pytest.mark.usefixtures("probe")
def test_a_network_trains_on_the_probe_s_count_and_the_process_keeps_its_own(monkeypatch):
    asked, seen = [], []
    monkeypatch.setattr(train, "training_threads", lambda config, **k: asked.append((config, k)) or 1)
    data = torch.randn(200, 3)
    starts = np.arange(0, 150)
    net = RecurrentNet(SALES)
    train.train_network(net, data, starts[:-10], starts[-10:], input_window=36, horizon=12,
                        training=TrainingConfig(max_epochs=2, batch_size=64, precision="float32"), seed=0,
                        device=torch.device("cpu"), on_epoch=lambda *a: seen.append(torch.get_num_threads()))
    assert seen == [1, 1]  # trained on the probe's one thread
    assert torch.get_num_threads() == 2  # and the process has its two again
    [(config, shape)] = asked
    assert config is net.config and shape == {"batch_size": 64, "input_window": 36, "precision": "float32"}


@pytest.mark.usefixtures("probe")
def test_the_probe_times_real_training_steps_and_leaves_torch_s_draws_alone():
    """Its network draws weights from torch's generator, which a night had just seeded for the
    network it trains next: that network's draws must be what they are without the probe."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    seconds = thread_probe.measure(SALES, batch_size=64, input_window=36, precision="float32", counts=[1, 2])
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_num_threads() == 2
    assert set(seconds) == {1, 2}
    assert all(0 < s < 60 and math.isfinite(s) for s in seconds.values())
