"""The recurrent network: one module for Elman RNN, LSTM and GRU, the cell chosen by name.

Input channels (built by forecasting.windows): 0 = the scaled target, 1..2 = sin/cos of the
position in the season, with `annual_cycle` 3..4 = sin/cos of the position in the year, then
the scaled covariates. The network forecasts the *residual* over a
reference forecast computed from its own input window (seasonal naive, last value, or none), so
`forward(x)` alone gives a complete forecast in scaled space - which is what gets logged.

Strategies:
- direct:    the head maps the last hidden state to all `horizon` steps at once;
- recursive: the head maps a hidden state to the next step; that prediction becomes the next
             input (calendar channels advanced by one step, covariates held at their last value)
             and the cell is stepped again, `horizon` times.

Training on the CPU (direct strategy) runs the cell through `sequence_kernel` below rather than
nn.LSTM/GRU/RNN's own CPU path: the same parameters and the same maths, in one matrix product
per step plus one native elementwise call (forecasting.sequence_kernel), with the products in
float32 or, with `training.precision: bf16-mixed`, in bfloat16 (see benchmarks/training_speed.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from forecasting.sequence_kernel import sequence_kernel

CELL_CLASSES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
STRATEGIES = ("direct", "recursive")
RESIDUALS = ("seasonal_naive", "last_value", "none")


@dataclass
class NetConfig:
    cell: str  # rnn | lstm | gru
    input_size: int  # features per time step
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0  # between stacked layers and before the head
    horizon: int = 1  # steps forecast per window
    strategy: str = "direct"  # direct | recursive
    season_length: int = 1
    residual: str = "seasonal_naive"  # reference forecast the network corrects
    calendar: bool = True  # channels 1, 2 are sin/cos of the position in the season
    annual_cycle: bool = False  # channels 3, 4 are sin/cos of the position in the year
    years_per_step: float = 0.0  # how far one step advances them (recursive strategy)
    local_level: bool = True  # feed the target relative to the window's last-season mean

    def __post_init__(self) -> None:
        if self.cell not in CELL_CLASSES:
            raise ValueError(f"`cell` ({self.cell!r}) is unknown; known: {list(CELL_CLASSES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` ({self.strategy!r}) is unknown; known: {list(STRATEGIES)}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"`residual` ({self.residual!r}) is unknown; known: {list(RESIDUALS)}")
        if self.horizon < 1:
            raise ValueError(f"`horizon` ({self.horizon!r}) must be >= 1")
        if self.annual_cycle and not self.calendar:  # the year's channels sit after the season's
            raise ValueError(f"`annual_cycle` ({self.annual_cycle!r}) needs `calendar` (False): "
                             "the year's sin/cos are channels 3, 4, after the season's")

    def to_dict(self) -> dict:
        return asdict(self)


class RecurrentNet(nn.Module):
    """Cell (stacked) -> dropout -> linear head; forecasts [batch, horizon] in scaled space."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        rnn_class = getattr(nn, CELL_CLASSES[config.cell])
        self.rnn = rnn_class(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        out = config.horizon if config.strategy == "direct" else 1
        self.head = nn.Linear(config.hidden_size, out)
        # Start as the reference forecast: the residual head begins at zero.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        angle = 2.0 * math.pi / config.season_length
        self.register_buffer("rotation", torch.tensor([math.cos(angle), math.sin(angle)]), persistent=False)
        angle = 2.0 * math.pi * config.years_per_step
        self.register_buffer("annual_rotation", torch.tensor([math.cos(angle), math.sin(angle)]), persistent=False)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The forecast the network corrects, from the target channel of the window."""
        b, w, _ = x.shape  # [batch, window, features]
        h, m = self.config.horizon, self.config.season_length
        y = x[:, :, 0]  # [batch, window]
        mode = self.config.residual
        if mode == "seasonal_naive" and w >= m:
            index = torch.arange(h, device=x.device) % m + (w - m)  # [horizon]: repeat the last season
            return y[:, index]  # [batch, horizon]
        if mode == "none":
            return y.new_zeros(b, h)  # [batch, horizon]
        return y[:, -1:].expand(b, h)  # [batch, horizon]: last value (also seasonal with window < season)

    def level(self, x: torch.Tensor) -> torch.Tensor:
        """The local level subtracted from the target channel: mean of the last season (or 0)."""
        if not self.config.local_level:
            return x.new_zeros(x.shape[0])  # [batch]
        m = min(self.config.season_length, x.shape[1])
        return x[:, -m:, 0].mean(dim=1)  # [batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.reference(x)  # [batch, horizon]
        level = self.level(x)  # [batch]
        if self.config.residual == "none":  # the level taken off the input is added back here
            base = base + level[:, None]  # [batch, horizon]
        x = torch.cat([x[:, :, :1] - level[:, None, None], x[:, :, 1:]], dim=-1)  # [batch, window, features]
        if self.config.strategy == "direct":
            if self._kernel(x):
                last = sequence_kernel(self.rnn, self.config.cell, x, last_only=True)  # [batch, hidden]
            else:
                last = self.rnn(x)[0][:, -1]  # [batch, hidden]
            return base + self.head(self.drop(last))  # [batch, horizon]
        out, state = self.rnn(x)  # out: [batch, window, hidden]
        preds = []
        row = x[:, -1:, :]  # [batch, 1, features]
        last = out[:, -1]  # [batch, hidden]
        for k in range(self.config.horizon):
            y = base[:, k] + self.head(self.drop(last))[:, 0]  # [batch]
            preds.append(y)
            if k + 1 == self.config.horizon:
                break
            row = self._next_row(row, y - level)  # [batch, 1, features]
            out, state = self.rnn(row, state)  # out: [batch, 1, hidden]
            last = out[:, -1]  # [batch, hidden]
        return torch.stack(preds, dim=1)  # [batch, horizon]

    def _kernel(self, x: torch.Tensor) -> bool:
        """Train through the CPU sequence kernels; inference (as fast either way, and keeping no
        per-step activations), CUDA (cuDNN) and tracing (torch.export when a model is logged: the
        kernels hand raw pointers to C) stay on nn's own path."""
        return (x.device.type == "cpu" and torch.is_grad_enabled() and self.rnn.weight_hh_l0.requires_grad
                and not torch.compiler.is_compiling())

    def _next_row(self, row: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The input row one step later: predicted target, calendar rotated, covariates held."""
        parts, first = [y[:, None, None]], 1  # [batch, 1, 1]; the first channel not yet advanced
        cycles = [self.rotation] if self.config.calendar else []
        if self.config.calendar and self.config.annual_cycle:
            cycles.append(self.annual_rotation)
        for rotation in cycles:
            sin, cos = row[..., first:first + 1], row[..., first + 1:first + 2]  # [batch, 1, 1] each
            c, s = rotation[0], rotation[1]
            parts += [sin * c + cos * s, cos * c - sin * s]
            first += 2
        parts.append(row[..., first:])  # [batch, 1, covariates]
        return torch.cat(parts, dim=-1)  # [batch, 1, features]


class EnsembleNet(nn.Module):
    """Several RecurrentNets of one config (different seeds); the forecast is their mean."""

    def __init__(self, config: NetConfig, members: int = 1) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"`members` ({members!r}) must be >= 1")
        self.config = config
        self.members = nn.ModuleList(RecurrentNet(config) for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0).mean(dim=0)  # [batch, horizon]
