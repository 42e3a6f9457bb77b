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
