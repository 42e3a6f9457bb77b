import pytest
import torch
from torch import nn

from forecasting.models import EnsembleNet, NetConfig, RecurrentNet
from tests.forecast_fixtures import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_shapes_for_each_cell_and_strategy(cell, cls, strategy):
    config = NetConfig(cell=cell, input_size=4, hidden_size=8, num_layers=2, dropout=0.1,
                       horizon=5, strategy=strategy, season_length=12)
    net = RecurrentNet(config)
    assert isinstance(net.rnn, cls) and net.rnn.num_layers == 2
    assert net.head.out_features == (5 if strategy == "direct" else 1)
    x = torch.randn(3, 24, 4)  # [batch, window, features]
    out = net(x)
    assert out.shape == (3, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_untrained_net_starts_at_the_seasonal_naive_reference(strategy):
    net = RecurrentNet(NetConfig(cell="gru", input_size=3, horizon=15, strategy=strategy, season_length=12))
    x = torch.randn(2, 24, 3)
    expected = x[:, 12:24, 0][:, torch.arange(15) % 12]  # the last season, repeated
    torch.testing.assert_close(net(x), expected)
    last = RecurrentNet(NetConfig(cell="gru", input_size=3, horizon=3, season_length=12, residual="last_value"))
    torch.testing.assert_close(last(x), x[:, -1:, 0].expand(2, 3))


@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_without_a_reference_the_level_taken_off_the_input_is_added_back(strategy):
    """residual 'none' with local_level: the network sees the window less its last season's
    mean, so a window shifted by c must give a forecast shifted by c, not the same forecast."""
    torch.manual_seed(0)
    net = RecurrentNet(NetConfig(cell="gru", input_size=3, horizon=4, strategy=strategy, season_length=12,
                                 residual="none", local_level=True))
    x = torch.randn(2, 24, 3)
    shifted = x.clone()
    shifted[:, :, 0] += 5.0
    torch.testing.assert_close(net(shifted) - net(x), torch.full((2, 4), 5.0), atol=1e-5, rtol=0)


def test_recursive_feeds_its_prediction_back_with_the_calendar_advanced():
    net = RecurrentNet(NetConfig(cell="rnn", input_size=4, horizon=2, strategy="recursive", season_length=4))
    row = torch.tensor([[[9.0, 0.0, 1.0, 5.0]]])  # value, sin, cos (position 0), covariate
    nxt = net._next_row(row, torch.tensor([2.0]))
    torch.testing.assert_close(nxt, torch.tensor([[[2.0, 1.0, 0.0, 5.0]]]), atol=1e-6, rtol=0)  # position 1


def test_recursive_advances_the_years_channels_by_one_step_too():
    net = RecurrentNet(NetConfig(cell="gru", input_size=6, horizon=2, strategy="recursive", season_length=4,
                                 annual_cycle=True, years_per_step=0.25))
    row = torch.tensor([[[9.0, 0.0, 1.0, 0.0, 1.0, 5.0]]])  # value, season sin/cos, year sin/cos, covariate
    nxt = net._next_row(row, torch.tensor([2.0]))
    torch.testing.assert_close(nxt, torch.tensor([[[2.0, 1.0, 0.0, 1.0, 0.0, 5.0]]]), atol=1e-6, rtol=0)
    assert "annual_rotation" not in net.state_dict()  # models saved before the option still load


def test_ensemble_averages_members():
    config = NetConfig(cell="lstm", input_size=3, horizon=4, season_length=12, residual="none")
    torch.manual_seed(0)
    ens = EnsembleNet(config, members=3)
    for member in ens.members:
        nn.init.normal_(member.head.weight)
    x = torch.randn(2, 12, 3)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ens.members]).mean(0))


def test_bad_config_names_the_parameter_and_value():
    with pytest.raises(ValueError, match=r"`cell` \('transformer'\) is unknown"):
        NetConfig(cell="transformer", input_size=3)
    with pytest.raises(ValueError, match=r"`strategy` \('both'\) is unknown"):
        NetConfig(cell="gru", input_size=3, strategy="both")
    with pytest.raises(ValueError, match=r"`horizon` \(0\) must be >= 1"):
        NetConfig(cell="gru", input_size=3, horizon=0)
    with pytest.raises(ValueError, match=r"`annual_cycle` \(True\) needs `calendar` \(False\)"):
        NetConfig(cell="gru", input_size=5, annual_cycle=True, calendar=False)


class _LayerPath:
    """Which path a test's layers take (see `step_kernels`), and the C loop's calls it saw."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, {"forward": 0, "backward": 0}

    def assert_taken(self, *, dtype: torch.dtype | None = torch.float64, backward: bool = True) -> None:
        """The C loop ran (forward, and backward too) exactly where this path and dtype mean it."""
        if self.name == "sequence" and dtype in (torch.float32, torch.float64):
            ran = self.calls["forward"] and (self.calls["backward"] or not backward)
            assert ran, f"the C loop did not run: {self.calls}"
        else:
            assert self.calls == {"forward": 0, "backward": 0}, f"the C loop ran on the {self.name} path: {self.calls}"


@pytest.fixture(params=["sequence", "fused_steps", "torch_ops"])
def step_kernels(request, monkeypatch) -> _LayerPath:
    """Where fused_cells.c builds (this machine has gcc): float32 and float64 layers run their whole
    time loop in one call into it ("sequence"), bf16-mixed ones a Python loop of fused updates.
    "fused_steps" runs every dtype through that Python loop (where torch exports no BLAS gemm),
    "torch_ops" through the torch-op fallback used where fused_cells.c cannot be built. The C
    loop's calls are counted, for `_LayerPath.assert_taken`."""
    from forecasting import fused_cells
    from forecasting.sequence_kernel import _FusedSequence

    path = _LayerPath(request.param)
    for direction in path.calls:
        def counted(*args, _real=getattr(_FusedSequence, direction), _direction=direction):
            path.calls[_direction] += 1
            return _real(*args)

        monkeypatch.setattr(_FusedSequence, direction, counted)
    if request.param == "sequence":
        assert fused_cells.sequence_kernels_for(torch.float64) and fused_cells.sequence_kernels_for(torch.float32), \
            "no whole-layer loop: fused_cells.c did not build or torch's BLAS gemm was not found (see the log)"
    else:
        monkeypatch.setattr(fused_cells, "sequence_kernels_for", lambda *dtypes: None)
    if request.param == "torch_ops":
        monkeypatch.setattr(fused_cells, "kernels_for", lambda *dtypes: None)
    else:
        assert fused_cells.kernels_for(torch.float64) and fused_cells.kernels_for(torch.float32, torch.bfloat16), \
            "fused_cells.c did not build: see the log"
    return path


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("window", [9, 1])  # 1: the kernel's first step (h_-1 = 0) is special-cased
def test_cpu_training_kernel_matches_torch_values_and_gradients(cell, cls, layers, window, step_kernels):
    """The hand-written CPU training path (models.sequence_kernel) is nn.RNN/LSTM/GRU's maths:
    same outputs and same gradients for the input and every weight and bias (float64)."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(0)
    rnn = cls(input_size=4, hidden_size=6, num_layers=layers, batch_first=True).double()
    x = torch.randn(5, window, 4, dtype=torch.float64, requires_grad=True)  # [batch, window, features]
    upstream = torch.randn(5, window, 6, dtype=torch.float64)

    expected = rnn(x)[0]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, *rnn.parameters()])
    got = sequence_kernel(rnn, cell, x)
    got_grads = torch.autograd.grad((got * upstream).sum(), [x, *rnn.parameters()])

    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for name, g, e in zip(["x", *(n for n, _ in rnn.named_parameters())], got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")
    step_kernels.assert_taken()


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_kernel_last_step_only_matches_torch_in_float32(cell, cls, step_kernels):
    """What training runs: float32, batch and hidden sizes that fill the vector loops, and only
    the last hidden state handed back (no gradient of zeros for the other steps)."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(1)
    rnn = cls(input_size=3, hidden_size=32, num_layers=2, batch_first=True)
    x = torch.randn(64, 20, 3)  # [batch, window, features]
    upstream = torch.randn(64, 32)

    expected = rnn(x)[0][:, -1]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), list(rnn.parameters()))
    got = sequence_kernel(rnn, cell, x, last_only=True)
    got_grads = torch.autograd.grad((got * upstream).sum(), list(rnn.parameters()))

    assert got.shape == (64, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, g, e in zip([n for n, _ in rnn.named_parameters()], got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")
    step_kernels.assert_taken(dtype=torch.float32)


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
@pytest.mark.parametrize("last_only", [True, False])
def test_kernel_edges_one_window_one_input_one_step(cell, cls, last_only, step_kernels):
    """The smallest shapes: batch 1, one input, a window of one step (only step 0, whose h_-1 is
    zero), and with every step an output a gradient that is one value broadcast (stride 0)."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(5)
    rnn = cls(input_size=1, hidden_size=5, batch_first=True).double()
    x = torch.randn(1, 1, 1, dtype=torch.float64, requires_grad=True)
    expected = rnn(x)[0][:, -1] if last_only else rnn(x)[0]
    got = sequence_kernel(rnn, cell, x, last_only=last_only)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    params = [x, *rnn.parameters()]
    for g, e in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    step_kernels.assert_taken()


@pytest.mark.parametrize("cell, cls", [("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_kernel_matches_torch_at_the_training_shape_on_two_threads(cell, cls, step_kernels):
    """What a night trains (batch 512, hidden 64, window 36, float32) with torch on two threads:
    the BLAS calls of the C loop then split across threads as torch's own products do."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(6)
    rnn = cls(input_size=3, hidden_size=64, batch_first=True)
    x = torch.randn(512, 36, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = rnn(x)[0][:, -1]
        expected_grads = torch.autograd.grad(expected.sum(), list(rnn.parameters()))
        got = sequence_kernel(rnn, cell, x, last_only=True)
        got_grads = torch.autograd.grad(got.sum(), list(rnn.parameters()))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, g, e in zip([n for n, _ in rnn.named_parameters()], got_grads, expected_grads):
        assert ((g - e).norm() / e.norm()).item() < 1e-4, f"gradient of {name}"  # float32 sums of 18k terms
    step_kernels.assert_taken(dtype=torch.float32)


def test_weights_of_another_dtype_than_the_input_take_the_python_loop(step_kernels):
    """The C loop writes the weights' gradients in the input's dtype: float64 weights fed float32
    windows must not reach it (their gradients would be garbage, or overrun float32 buffers the
    other way round); the Python loop gives the same gradients as float64 all through."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(7)
    rnn = nn.GRU(input_size=3, hidden_size=8, batch_first=True).double()
    x = torch.randn(4, 6, 3)
    got = torch.autograd.grad(sequence_kernel(rnn, "gru", x, last_only=True).sum(), list(rnn.parameters()))
    step_kernels.assert_taken(dtype=None)  # never the C loop, whatever the path
    expected = torch.autograd.grad(sequence_kernel(rnn, "gru", x.double(), last_only=True).sum(),
                                   list(rnn.parameters()))
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_loading_the_fused_kernels_leaves_float_semantics_alone():
    """fused_cells.c is compiled with -ffast-math; linked with it, gcc would add crtfastmath.o and
    turn on flush-to-zero for the whole process on load. Subnormal floats must survive."""
    from forecasting import fused_cells

    assert fused_cells.library() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal in float32
    assert (tiny * 1.0).item() != 0.0
    assert (tiny + 0.0).item() != 0.0


def test_fused_kernels_can_be_switched_off(monkeypatch):
    from forecasting import fused_cells

    monkeypatch.setenv("FORECASTING_FUSED_CELLS", "0")
    fused_cells.library.cache_clear()
    try:
        assert fused_cells.kernels_for(torch.float32) is None
    finally:
        fused_cells.library.cache_clear()


def test_fused_kernels_are_built_into_the_cache_directory(monkeypatch, tmp_path):
    from forecasting import fused_cells

    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(tmp_path))
    fused_cells.library.cache_clear()
    try:
        assert fused_cells.library() is not None
        built = list(tmp_path.glob("fused_cells-*.so"))
        assert len(built) == 1
        assert not [p for p in tmp_path.iterdir() if p not in built]  # no temporary left behind
    finally:
        fused_cells.library.cache_clear()


def test_training_uses_the_kernel_and_inference_uses_torch(monkeypatch):
    import forecasting.models as models

    calls = []
    real = models.sequence_kernel
    monkeypatch.setattr(models, "sequence_kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    net = RecurrentNet(NetConfig(cell="lstm", input_size=3, horizon=4, season_length=12))
    x = torch.randn(2, 24, 3)
    trained = net(x)
    with torch.inference_mode():
        inferred = net(x)
    assert calls == [1]
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_bf16_mixed_products_stay_close_to_float32(cell, cls, step_kernels):
    from forecasting.sequence_kernel import matmul_precision, sequence_kernel

    torch.manual_seed(2)
    rnn = cls(input_size=3, hidden_size=32, num_layers=2, batch_first=True)
    x = torch.randn(64, 24, 3, requires_grad=True)  # [batch, window, features]
    upstream = torch.randn(64, 32)

    def run():
        out = sequence_kernel(rnn, cell, x, last_only=True)
        return out, torch.autograd.grad((out * upstream).sum(), [x, *rnn.parameters()])

    exact, exact_grads = run()
    step_kernels.assert_taken(dtype=torch.float32)
    step_kernels.calls.update(forward=0, backward=0)
    with matmul_precision("bf16-mixed"):
        mixed, mixed_grads = run()
    assert not torch.equal(mixed, exact), "the products did not run in bfloat16"
    torch.testing.assert_close(mixed, exact, rtol=0, atol=3e-2)
    for name, g, e in zip(["x", *(n for n, _ in rnn.named_parameters())], mixed_grads, exact_grads):
        assert g.dtype == torch.float32
        assert ((g - e).norm() / e.norm()).item() < 3e-2, f"gradient of {name}"
    step_kernels.assert_taken(dtype=torch.bfloat16)  # its products go through torch: the Python loop


def test_matmul_precision_is_set_for_the_fit_only_and_checked():
    import numpy as np

    from forecasting import sequence_kernel as kernel
    from forecasting.config import TrainingConfig
    from forecasting.train import train_network

    with pytest.raises(ValueError, match=r"`precision` \('fp8'\) is unknown"):
        with kernel.matmul_precision("fp8"):
            pass
    seen = []
    net = RecurrentNet(NetConfig(cell="gru", input_size=3, horizon=4, season_length=12))
    training = TrainingConfig(max_epochs=2, max_batches_per_epoch=1, batch_size=16, precision="bf16-mixed", device="cpu")
    train_network(net, torch.randn(120, 3), np.arange(0, 80), np.arange(80, 90), input_window=24, horizon=4,
                  training=training, seed=0, device=torch.device("cpu"),
                  on_epoch=lambda *_: seen.append(kernel._MATMUL_DTYPE.get()))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert kernel._MATMUL_DTYPE.get() == torch.float32  # back to the default after the fit


def test_bf16_mixed_asked_for_on_cuda_trains_in_float32_with_a_warning(caplog, monkeypatch):
    from forecasting import train
    from forecasting.train import effective_precision

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="forecasting.train"):
        assert effective_precision("bf16-mixed", torch.device("cuda")) == "float32"
    assert "applies to CPU training; on cuda the networks train in float32" in caplog.text
    assert effective_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"
    assert effective_precision("float32", torch.device("cuda")) == "float32"


@pytest.mark.parametrize(("native", "faster", "device", "expected"), [
    (True, True, "cpu", "bf16-mixed"),   # avx512_bf16, and its steps measured faster here
    (True, False, "cpu", "float32"),     # avx512_bf16 and AMX, yet float32's C loop as fast (a Xeon)
    (False, True, "cpu", "float32"),     # AVX2 only: emulated bfloat16 is 8-12x slower
    (None, True, "cpu", "float32"),      # torch cannot tell (not x86): the safe choice
    (True, True, "cuda", "float32"),     # bf16-mixed is the CPU kernel's
])
def test_auto_precision_takes_bf16_mixed_only_on_a_cpu_where_it_trains_faster(
        native, faster, device, expected, monkeypatch, caplog):
    from forecasting import train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(train, "bf16_trains_faster", lambda: faster)
    with caplog.at_level("WARNING", logger="forecasting.train"):
        assert train.effective_precision("auto", torch.device(device)) == expected
    assert caplog.text == ""  # auto's choice is not a misconfiguration


def test_the_recursive_strategy_trains_and_reports_float32_whatever_was_asked_for(monkeypatch, caplog):
    """bf16-mixed is the direct strategy's kernel: a recursive network trains in float32, and
    the run's `precision_applied` param says so (it said bf16-mixed, with a slowness warning)."""
    from forecasting import train
    from forecasting.config import TrainingConfig

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(train, "bf16_trains_faster", lambda: True)
    with caplog.at_level("WARNING", logger="forecasting.train"):
        assert train.effective_precision("auto", torch.device("cpu"), "recursive") == "float32"
        assert caplog.text == ""
        assert train.effective_precision("bf16-mixed", torch.device("cpu"), "recursive") == "float32"
    assert "with `strategy` ('recursive') the networks train in float32" in caplog.text
    assert train.applied_precision(TrainingConfig(strategy="recursive", device="cpu")) == "float32"
    assert train.applied_precision(TrainingConfig(strategy="direct", device="cpu")) == "bf16-mixed"


def test_bf16_mixed_by_name_on_a_cpu_without_it_is_kept_and_warned_about_once(monkeypatch, caplog):
    from forecasting import train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    train._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="forecasting.train"):
        for _ in range(3):  # a night fits many networks
            assert train.effective_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"
    warnings = [r for r in caplog.records if "no native bfloat16 products" in r.getMessage()]
    assert len(warnings) == 1
    assert "8-12x slower" in warnings[0].getMessage() and "precision: auto" in warnings[0].getMessage()
    train._warn_emulated_bf16.cache_clear()


def test_training_precision_defaults_to_auto_and_the_applied_one_is_a_param(monkeypatch):
    from forecasting import train
    from forecasting.config import TrainingConfig
    from forecasting.forecasters import make_forecaster

    assert TrainingConfig().precision == "auto"
    monkeypatch.setattr(train, "bf16_trains_faster", lambda: True)
    for native, applied in ((True, "bf16-mixed"), (False, "float32")):
        monkeypatch.setattr(train, "cpu_has_native_bf16", lambda native=native: native)
        forecaster = make_forecaster("lstm", freq="MS", horizon=3, season_length=12,
                                     training=TrainingConfig(device="cpu"))
        assert forecaster.params["precision"] == "auto"
        assert forecaster.params["precision_applied"] == applied


def test_buffer_pool_reuses_by_shape_and_stays_under_its_bound():
    from forecasting.buffers import BufferPool

    pool = BufferPool(max_bytes=3 * 4 * 1000)  # three float32 [1000] buffers
    cpu = torch.device("cpu")
    a = pool.take(1000, dtype=torch.float32, device=cpu)
    pool.give(a)
    assert pool.take(1000, dtype=torch.float32, device=cpu) is a  # same shape: the same storage
    assert pool.take(1000, dtype=torch.float32, device=cpu) is not a  # none free: a fresh one
    assert pool.take(1000, dtype=torch.float64, device=cpu) is not a  # another dtype never shares
    pool.give(*(torch.empty(1000) for _ in range(5)), None)
    assert pool.free_bytes == 3 * 4 * 1000  # the two oldest were dropped
    with pytest.raises(ValueError, match=r"`max_bytes` \(-1\) must be >= 0"):
        BufferPool(max_bytes=-1)


def test_buffer_pool_evicts_past_a_shape_whose_buffers_are_all_taken():
    """A shape whose last free buffer was taken left an empty list behind; once it was the
    oldest, eviction popped from it and every later backward pass raised IndexError (seen with
    two networks training in threads, and a 2-layer net on a small pool)."""
    from forecasting.buffers import BufferPool

    cpu = torch.device("cpu")
    pool = BufferPool(max_bytes=4 * 1000)
    pool.give(torch.empty(1000))
    held = pool.take(1000, dtype=torch.float32, device=cpu)  # [1000]'s list is empty now, and oldest
    pool.give(torch.empty(500), torch.empty(2000))  # over the bound: evicts, oldest first
    assert pool.free_bytes <= 4 * 1000
    pool.give(held)
    assert pool.take(1000, dtype=torch.float32, device=cpu) is held


def test_kernel_outputs_survive_later_training_steps():
    """The kernel's buffers go back to a pool after each backward pass: what it returned must not
    be one of them (a later step would overwrite a forecast or activation someone still holds)."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(3)
    rnn = nn.GRU(input_size=3, hidden_size=8, num_layers=2, batch_first=True)
    x = torch.randn(16, 12, 3)
    first = sequence_kernel(rnn, "gru", x, last_only=True)
    first.sum().backward()
    kept = first.detach().clone()
    for _ in range(3):
        sequence_kernel(rnn, "gru", torch.randn(16, 12, 3), last_only=True).sum().backward()
    torch.testing.assert_close(first.detach(), kept, rtol=0, atol=0)


def test_kernel_backward_twice_is_refused_not_wrong():
    from forecasting.sequence_kernel import sequence_kernel

    rnn = nn.LSTM(input_size=3, hidden_size=8, batch_first=True)
    out = sequence_kernel(rnn, "lstm", torch.randn(4, 6, 3), last_only=True).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.backward()


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_kernel_takes_a_strided_upstream_gradient(cell, cls, step_kernels):
    """The gradient arriving at the last hidden state need not be row-major (a transposed
    product upstream): the fused kernels read rows, so the kernel must hand them rows."""
    from forecasting.sequence_kernel import sequence_kernel

    torch.manual_seed(4)
    rnn = cls(input_size=3, hidden_size=16, batch_first=True).double()
    x = torch.randn(8, 7, 3, dtype=torch.float64)
    upstream = torch.randn(16, 8, dtype=torch.float64).t()  # [batch, hidden], column-major
    expected = torch.autograd.grad(rnn(x)[0][:, -1], list(rnn.parameters()), upstream)
    got = torch.autograd.grad(sequence_kernel(rnn, cell, x, last_only=True), list(rnn.parameters()), upstream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    step_kernels.assert_taken()


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_kernel_lets_nan_through_as_torch_does(cell, cls, step_kernels):
    """A diverged weight must give NaN (and so NaN losses), not a finite state: fused_cells.c is
    built with -ffast-math, whose finite-math assumption would clamp NaN away."""
    from forecasting.sequence_kernel import sequence_kernel

    rnn = cls(input_size=3, hidden_size=16, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0[0, 0] = float("nan")
    x = torch.randn(8, 5, 3)
    assert rnn(x)[0][:, -1].isnan().any()
    assert sequence_kernel(rnn, cell, x, last_only=True).isnan().any()
    step_kernels.assert_taken(dtype=torch.float32, backward=False)


def test_a_failed_build_falls_back_to_torch_ops_with_a_warning(monkeypatch, tmp_path, caplog):
    """No working compiler (here $CC names none): one warning, no library, and training still
    runs (the torch-op steps) with nn's results."""
    from forecasting import fused_cells

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FORECASTING_CACHE_DIR", str(tmp_path / "cache"))
    fused_cells.library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="forecasting.fused_cells"):
            assert fused_cells.kernels_for(torch.float32) is None
        assert "could not be built or loaded" in caplog.text and "torch ops instead" in caplog.text
        _assert_training_gru_matches_nn()
    finally:
        fused_cells.library.cache_clear()


def _assert_training_gru_matches_nn() -> None:
    """sequence_kernel, on whichever path it takes now, gives nn.GRU's last state."""
    from forecasting.sequence_kernel import sequence_kernel

    rnn = nn.GRU(input_size=3, hidden_size=8, batch_first=True)
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(sequence_kernel(rnn, "gru", x, last_only=True), rnn(x)[0][:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("why", ["no_symbol", "disagrees"])
def test_without_a_usable_blas_gemm_the_layer_loop_stays_in_python(monkeypatch, caplog, why):
    """The one-call loop needs the ?gemm_ torch links: where torch exports none, or where it
    does not agree with torch.mm on a small product, the loop runs in Python (one log line
    says why) with nn's results."""
    from forecasting import fused_cells

    if why == "no_symbol":
        monkeypatch.setitem(fused_cells.SEQUENCE_VARIANTS, torch.float32, ("f32", "no_such_gemm_"))
    else:
        monkeypatch.setattr(fused_cells, "_gemm_agrees_with_torch", lambda *args: False)
    fused_cells.blas_gemm.cache_clear()
    try:
        with caplog.at_level("INFO", logger="forecasting.fused_cells"):
            assert fused_cells.sequence_kernels_for(torch.float32) is None
        expected = {"no_symbol": "torch exports no no_such_gemm_", "disagrees": "sgemm_ in"}[why]
        assert expected in caplog.text and "layer loops stay in Python" in caplog.text
        assert fused_cells.kernels_for(torch.float32) is not None  # the per-step kernels still serve
        _assert_training_gru_matches_nn()
    finally:
        fused_cells.blas_gemm.cache_clear()


def _python_sgemm(int_type, *, fault: str | None = None):
    """A Fortran sgemm_ written in Python (numpy on the caller's memory), as a C function
    pointer: its integers read as `int_type` (c_int32: an LP64 BLAS, c_int64: ILP64). `fault`:
    "no_op" leaves C alone, "ignores_beta" overwrites C where it should add to it."""
    import ctypes

    import numpy as np

    fp, ip = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(int_type)

    def matrix(pointer, rows, cols, ld):  # column-major [rows, cols], columns ld apart
        flat = np.ctypeslib.as_array(pointer, shape=(ld * (cols - 1) + rows,))
        return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(4, 4 * ld))

    def gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, _la, _lb):
        m, n, k = m[0], n[0], k[0]
        op_a = matrix(a, k, m, lda[0]).T if ta == b"T" else matrix(a, m, k, lda[0])
        op_b = matrix(b, n, k, ldb[0]).T if tb == b"T" else matrix(b, k, n, ldb[0])
        out = matrix(c, m, n, ldc[0])
        if fault != "no_op":
            out[...] = alpha[0] * (op_a @ op_b) + (beta[0] * out if beta[0] and fault != "ignores_beta" else 0)

    signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ip, ip, ip, fp, fp, ip, fp, ip, fp, fp, ip,
                                 ctypes.c_size_t, ctypes.c_size_t)
    function = signature(gemm)
    return function, ctypes.cast(function, ctypes.c_void_p).value


@pytest.mark.parametrize("int_type, fault, agrees", [
    ("c_int32", None, True),             # an LP64 BLAS reads the low half of each 64-bit integer passed
    ("c_int64", None, True),             # an ILP64 BLAS all of it
    ("c_int64", "no_op", False),         # a gemm that does not multiply is refused
    ("c_int64", "ignores_beta", False),  # so is one that cannot accumulate (the weight gradients do)
])
def test_the_blas_check_passes_lp64_and_ilp64_gemms_and_refuses_a_wrong_one(int_type, fault, agrees):
    """fused_cells.c passes every integer to ?gemm_ as a 64-bit value, so BLAS built with either
    integer width read the right sizes; `_gemm_agrees_with_torch` is what keeps out a gemm that
    multiplies wrongly (every operand layout and C += A B)."""
    import ctypes

    from forecasting import fused_cells

    keep_alive, gemm = _python_sgemm(getattr(ctypes, int_type), fault=fault)
    assert fused_cells._gemm_agrees_with_torch(fused_cells.library().matmul_f32, gemm, torch.float32) is agrees
    assert keep_alive  # the callback must outlive the calls through its pointer


def test_torch_threads_follow_omp_num_threads_else_the_cpus_this_process_may_use(monkeypatch):
    import os

    from forecasting.train import configure_torch_threads

    from forecasting import thread_probe

    previous = torch.get_num_threads()
    monkeypatch.setattr(thread_probe, "_pinned", thread_probe._pinned)  # given back after the test
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_torch_threads() == 1 == torch.get_num_threads()
        assert thread_probe._pinned  # the user's count: every network trains on it
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert configure_torch_threads() == len(os.sched_getaffinity(0))
        assert not thread_probe._pinned  # the most each network's probe may choose
        assert configure_torch_threads(3) == 3 and thread_probe._pinned  # a count given here pins
        assert configure_torch_threads(pin=True) == len(os.sched_getaffinity(0)) and thread_probe._pinned
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_torchs_openmp_threads_sleep_when_they_wait_unless_the_user_chose(given):
    """Spinning OpenMP threads (libgomp's default) took the cores from another process's: two
    nights training at once on 2 cores each took 4.8x as long as one alone (3.5x to 8.7x). libgomp reads
    OMP_WAIT_POLICY once, as torch loads it: the flow's import must set it before torch loads."""
    import os
    import subprocess
    import sys

    code = ("import importlib.abc, os, sys\n"
            "seen = []\n"
            "class Spy(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen:\n"
            "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import flows.nightly\n"
            "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == repr([given or "PASSIVE"])  # as torch loaded: PASSIVE, or the user's
