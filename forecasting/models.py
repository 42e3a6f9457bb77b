"""The recurrent network: one module for Elman RNN, LSTM and GRU, the cell chosen by name.

Input channels (built by forecasting.windows): 0 = the scaled target, 1..2 = sin/cos of the
position in the season, 3.. = scaled covariates. The network forecasts the *residual* over a
reference forecast computed from its own input window (seasonal naive, last value, or none), so
`forward(x)` alone gives a complete forecast in scaled space - which is what gets logged.

Strategies:
- direct:    the head maps the last hidden state to all `horizon` steps at once;
- recursive: the head maps a hidden state to the next step; that prediction becomes the next
             input (calendar channels advanced by one step, covariates held at their last value)
             and the cell is stepped again, `horizon` times.

Training on the CPU (direct strategy) runs the cell through `sequence_kernel` below rather than
nn.LSTM/GRU/RNN's own CPU path: the same parameters and the same maths, about 1.4x (GRU) to 1.6x
(LSTM) more training windows per second at these sizes (see benchmarks/training_speed.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F

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

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- CPU sequence kernels
# nn.LSTM on the CPU trains through oneDNN and nn.GRU/nn.RNN through one autograd node per time
# step; at batch 512, hidden 64 that is ~95% of a training step, and this torch build runs both
# well below its matrix-product speed. `_SequenceLayer` runs one layer over a whole window
# without autograd inside. All weights are packed into one matrix W of [input + 1 + hidden,
# gates] rows and each step keeps [x_t, 1, h_t-1] in one row block Z_t, so a step's
# pre-activations are ONE product Z_t @ W, and in the backward pass one product Z_t^T @ dpre
# per step accumulates every weight and bias gradient while those rows are in cache. Those
# products are most of the time and run near the CPU's peak, so W's known zeros are left out of
# them: GRU keeps the input and recurrent parts of n apart, so its h rows are zero in the n-input
# columns (a quarter of W), which take a separate small [x_t, 1] product instead (~25% fewer
# FLOPs per GRU step). At step 0, h_-1 = 0: only the [x_0, 1] rows are multiplied, and no
# gradient goes to h_-1. (The [x, 1] part of the whole window as one product before the loop,
# and its gradients as one after it, would leave only h_t-1 @ W_h per step, but products with
# input + 1 = 4 rows of depth over window x batch rows are memory-bound here: measured slower.)
# The activations are a few fused in-place ops on buffers allocated once per call. Gate layouts,
# parameters and results are nn.LSTM/GRU/RNN's (tests compare them to float precision).


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place as 2 sigmoid(2x) - 1: this torch build's tanh kernel is ~2x slower (AVX2)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _one_minus_square(x: torch.Tensor, *, out: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(ones, x, x, value=-1.0, out=out)  # 1 - x^2: tanh' from tanh


def _sigmoid_grad(s: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(s, s, s, value=-1.0, out=out)  # s (1 - s): sigmoid' from sigmoid


def _gates(cell: str, hid: int) -> tuple[int, int]:
    """(gate columns, how many of them - the leading ones - see h_t-1). GRU keeps the input and
    recurrent parts of n apart (n = tanh(W_in x + b_in + r (W_hn h + b_hn))), n input last."""
    return {"lstm": (4 * hid, 4 * hid), "gru": (4 * hid, 3 * hid), "rnn": (hid, hid)}[cell]


def _pack(cell: str, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """W [input + 1 + hidden, gates] with [x_t, 1, h_t-1] @ W = the pre-activations of a step."""
    n_in, hid = w_ih.shape[1], w_hh.shape[1]
    if cell != "gru":
        return torch.cat([w_ih.t(), (b_ih + b_hh)[None], w_hh.t()], dim=0)
    w = w_ih.new_zeros(n_in + 1 + hid, 4 * hid)  # columns: r, z (input + recurrent), n recurrent, n input
    w[:n_in, :2 * hid] = w_ih[:2 * hid].t()
    w[:n_in, 3 * hid:] = w_ih[2 * hid:].t()
    w[n_in, :2 * hid] = b_ih[:2 * hid] + b_hh[:2 * hid]
    w[n_in, 2 * hid:3 * hid] = b_hh[2 * hid:]
    w[n_in, 3 * hid:] = b_ih[2 * hid:]
    w[n_in + 1:, :3 * hid] = w_hh.t()  # w_hh's rows r, z, n; zero in the n-input columns
    return w


def _unpack(cell: str, d_w: torch.Tensor, n_in: int, hid: int) -> tuple[torch.Tensor, ...]:
    """(d_w_ih, d_w_hh, d_b_ih, d_b_hh) from the gradient of the packed W."""
    if cell != "gru":  # one bias sum, two .grad tensors: never hand autograd the same one twice
        return d_w[:n_in].t().contiguous(), d_w[n_in + 1:].t().contiguous(), d_w[n_in].clone(), d_w[n_in].clone()
    rz, n_x = slice(0, 2 * hid), slice(3 * hid, 4 * hid)
    d_w_ih = torch.cat([d_w[:n_in, rz], d_w[:n_in, n_x]], dim=1).t().contiguous()
    d_b_ih = torch.cat([d_w[n_in, rz], d_w[n_in, n_x]])
    return d_w_ih, d_w[n_in + 1:, :3 * hid].t().contiguous(), d_b_ih, d_w[n_in, :3 * hid].clone()


class _SequenceLayer(torch.autograd.Function):
    """One nn.LSTM/GRU/RNN layer (bias, tanh, zero initial state) over time-major x [window, batch, input]."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor, cell: str) -> torch.Tensor:
        t_len, batch, n_in = x.shape
        hid, k = w_hh.shape[1], n_in + 1  # Z_t's first k columns, [x_t, 1], see every gate
        gates, rec = _gates(cell, hid)
        w = _pack(cell, w_ih, w_hh, b_ih, b_hh)  # [input + 1 + hidden, gates]
        w_fwd = w
        if cell == "lstm":  # double the candidate's pre-activation: one sigmoid gives tanh = 2 s(2a) - 1
            w_fwd = w.clone()
            w_fwd[:, 2 * hid:3 * hid] *= 2.0
        z = x.new_empty(t_len + 1, batch, k + hid)  # row t: [x_t, 1, h_t-1]
        z[:t_len, :, :n_in] = x
        z[:, :, n_in] = 1.0
        z[0, :, k:] = 0.0
        h_all = z[:, :, k:]  # [window + 1, batch, hidden]: h_t-1 in row t, written by step t - 1
        pre = x.new_empty(t_len, batch, gates)  # activations, kept for the backward
        cells = x.new_empty(2, t_len, batch, hid) if cell == "lstm" else None  # c_t and tanh(c_t)
        for t in range(t_len):
            a, h_prev, h = pre[t], h_all[t], h_all[t + 1]  # a: [batch, gates]
            if not t:  # h_-1 = 0: the x and bias rows only
                torch.mm(z[t, :, :k], w_fwd[:k], out=a)
            elif rec < gates:  # GRU: the h rows are zero in the n-input columns
                torch.mm(z[t], w_fwd[:, :rec], out=a[:, :rec])
                torch.mm(z[t, :, :k], w_fwd[:k, rec:], out=a[:, rec:])
            else:
                torch.mm(z[t], w_fwd, out=a)
            if cell == "lstm":
                a.sigmoid_()
                i, f, g, o = a.chunk(4, 1)
                g.mul_(2.0).sub_(1.0)
                c = torch.mul(f, cells[0, t - 1], out=cells[0, t]) if t else cells[0, t].zero_()
                c.addcmul_(i, g)
                tanh_c = torch.mul(c, 2.0, out=cells[1, t]).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(c)
                torch.mul(o, tanh_c, out=h)
            elif cell == "gru":
                rz = a[:, :2 * hid].sigmoid_()
                n = _tanh_(a[:, 3 * hid:].addcmul_(rz[:, :hid], a[:, 2 * hid:3 * hid]))
                torch.sub(h_prev, n, out=h).mul_(rz[:, hid:]).add_(n)  # n + z (h_prev - n)
            else:
                _tanh_(torch.mul(a, 1.0, out=h))
        ctx.cell, ctx.n_in = cell, n_in
        ctx.w, ctx.z, ctx.pre, ctx.cells = w, z, pre, cells
        return h_all[1:]  # [window, batch, hidden]

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cell, n_in, w, z, pre, cells = ctx.cell, ctx.n_in, ctx.w, ctx.z, ctx.pre, ctx.cells
        t_len, batch, gates = pre.shape
        k = n_in + 1
        hid = z.shape[2] - k
        rec = _gates(cell, hid)[1]
        h_all = z[:, :, k:]
        w_x, w_h = w[:n_in].t(), w[k:, :rec].t()  # [gates, input], [rec, hidden]
        d_w = w.new_zeros(w.shape)
        d_x = z.new_empty(t_len, batch, n_in) if ctx.needs_input_grad[0] else None
        d_pre, tmp = z.new_empty(batch, gates), z.new_empty(batch, hid)
        d_rec = d_pre[:, :rec]  # [batch, rec]: the gates that see h_t-1
        ones = z.new_ones(batch, hid)
        dh, dc = z.new_zeros(batch, hid), z.new_zeros(batch, hid)
        for t in range(t_len - 1, -1, -1):
            dh += d_out[t]
            a, h, h_prev = pre[t], h_all[t + 1], h_all[t]
            if cell == "lstm":
                i, f, g, o = a.chunk(4, 1)
                di, df, dg, do = d_pre.chunk(4, 1)
                tc = cells[1, t]
                _sigmoid_grad(o, out=do).mul_(dh).mul_(tc)
                dc.addcmul_(_one_minus_square(tc, out=tmp, ones=ones).mul_(o), dh)
                _sigmoid_grad(i, out=di).mul_(dc).mul_(g)
                if t:
                    _sigmoid_grad(f, out=df).mul_(dc).mul_(cells[0, t - 1])
                else:
                    df.zero_()  # the cell before step 0 is zero
                _one_minus_square(g, out=dg, ones=ones).mul_(dc).mul_(i)
                dc.mul_(f)
            elif cell == "gru":
                r, zg, n_h, n = a.chunk(4, 1)  # n_h: W_hn h + b_hn
                dr, dz, dn_h, dn = d_pre.chunk(4, 1)
                torch.sub(ones, zg, out=dn).mul_(dh).mul_(_one_minus_square(n, out=tmp, ones=ones))
                torch.sub(h_prev, n, out=dz).mul_(dh).mul_(_sigmoid_grad(zg, out=tmp))
                _sigmoid_grad(r, out=dr).mul_(dn).mul_(n_h)
                torch.mul(dn, r, out=dn_h)
            else:
                _one_minus_square(h, out=d_pre, ones=ones).mul_(dh)
            if d_x is not None:
                torch.mm(d_pre, w_x, out=d_x[t])
            if not t:  # h_-1 = 0: the x and bias rows only, and no state before it to pass dh to
                d_w[:k].addmm_(z[t, :, :k].t(), d_pre)
                break
            if rec < gates:  # GRU: every weight and bias of this step but the zero block
                d_w[:, :rec].addmm_(z[t].t(), d_rec)
                d_w[:k, rec:].addmm_(z[t, :, :k].t(), d_pre[:, rec:])
            else:
                d_w.addmm_(z[t].t(), d_pre)  # every weight and bias of this step
            if cell == "gru":
                dh.mul_(zg).addmm_(d_rec, w_h)  # [batch, hidden]: through z and through the gates
            else:
                torch.mm(d_rec, w_h, out=dh)  # [batch, hidden]
        return (d_x, *_unpack(cell, d_w, n_in, hid), None)


def sequence_kernel(rnn: nn.RNNBase, cell: str, x: torch.Tensor) -> torch.Tensor:
    """`rnn(x)[0]` from a zero state, for batch-first x, through `_SequenceLayer` (CPU)."""
    seq = x.transpose(0, 1)  # [window, batch, features]
    for k in range(rnn.num_layers):
        if k and rnn.dropout and rnn.training:  # nn.RNNBase drops between layers only
            seq = F.dropout(seq, rnn.dropout, training=True)
        seq = _SequenceLayer.apply(seq, getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}"),
                                   getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}"), cell)
    return seq.transpose(0, 1)  # [batch, window, hidden]


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
        x = torch.cat([x[:, :, :1] - level[:, None, None], x[:, :, 1:]], dim=-1)  # [batch, window, features]
        if self.config.strategy == "direct":
            out = sequence_kernel(self.rnn, self.config.cell, x) if self._kernel(x) else self.rnn(x)[0]
            return base + self.head(self.drop(out[:, -1]))  # [batch, horizon]
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
        per-step activations) and CUDA (cuDNN) stay on nn's own path."""
        return x.device.type == "cpu" and torch.is_grad_enabled() and self.rnn.weight_hh_l0.requires_grad

    def _next_row(self, row: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The input row one step later: predicted target, calendar rotated, covariates held."""
        parts = [y[:, None, None]]  # [batch, 1, 1]
        if self.config.calendar:
            sin, cos = row[..., 1:2], row[..., 2:3]  # [batch, 1, 1] each
            c, s = self.rotation[0], self.rotation[1]
            parts += [sin * c + cos * s, cos * c - sin * s]
            parts.append(row[..., 3:])  # [batch, 1, covariates]
        else:
            parts.append(row[..., 1:])
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
