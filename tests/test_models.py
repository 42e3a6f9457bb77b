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


def test_recursive_feeds_its_prediction_back_with_the_calendar_advanced():
    net = RecurrentNet(NetConfig(cell="rnn", input_size=4, horizon=2, strategy="recursive", season_length=4))
    row = torch.tensor([[[9.0, 0.0, 1.0, 5.0]]])  # value, sin, cos (position 0), covariate
    nxt = net._next_row(row, torch.tensor([2.0]))
    torch.testing.assert_close(nxt, torch.tensor([[[2.0, 1.0, 0.0, 5.0]]]), atol=1e-6, rtol=0)  # position 1


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


@pytest.mark.parametrize("cell, cls", [("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("window", [9, 1])  # 1: the kernel's first step (h_-1 = 0) is special-cased
def test_cpu_training_kernel_matches_torch_values_and_gradients(cell, cls, layers, window):
    """The hand-written CPU training path (models.sequence_kernel) is nn.RNN/LSTM/GRU's maths:
    same outputs and same gradients for the input and every weight and bias (float64)."""
    from forecasting.models import sequence_kernel

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


def test_training_uses_the_kernel_and_inference_uses_torch(monkeypatch):
    import forecasting.models as models

    calls = []
    real = models.sequence_kernel
    monkeypatch.setattr(models, "sequence_kernel", lambda *a: calls.append(1) or real(*a))
    net = RecurrentNet(NetConfig(cell="lstm", input_size=3, horizon=4, season_length=12))
    x = torch.randn(2, 24, 3)
    trained = net(x)
    with torch.inference_mode():
        inferred = net(x)
    assert calls == [1]
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-6)
