"""The CPU training path of the recurrent networks: one nn.LSTM/GRU/RNN layer over a window as
one autograd node, its matrix products in float32 or bfloat16 (bf16-mixed).

forecasting.models trains through `sequence_kernel` on the CPU; inference, CUDA and tracing stay
on nn's own path. In float32 and float64 a layer's whole time loop, forward or backward, is
one call into fused_cells.c (`_FusedSequence`); elsewhere (bf16-mixed, or no BLAS gemm found)
the loop runs here with each step's elementwise update one call into fused_cells.c, or torch
ops where that does not build (forecasting.fused_cells).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F

from forecasting import fused_cells
from forecasting.buffers import BufferPool

# nn.LSTM on the CPU trains through oneDNN and nn.GRU/nn.RNN through one autograd node per time
# step; at batch 512, hidden 64 that is ~95% of a training step, and this torch build runs both
# well below its matrix-product speed. `_SequenceLayer` runs one layer over a whole window
# without autograd inside. All weights are packed into one matrix W of [input + 1 + hidden,
# gates] rows and each step keeps [x_t, 1, h_t-1] in one row block Z_t, so a step's
# pre-activations are ONE product Z_t @ W. Inside the backward loop one product per step passes
# the gradient back in time, dpre_t @ W_h^T; the weight and bias gradients are Z^T @ dpre: in
# fused_cells.c's loop Z_t^T @ dpre_t step by step, while dpre_t is still in cache (~20% faster
# than one product after the loop, which reads every step's dpre back from memory), in the
# Python loop one product over all steps after it (a product per step costs a dispatch). Products are
# most of the time and run near the CPU's peak, so W's known zeros are left out of them: GRU
# keeps the input and recurrent parts of n apart, so its h rows are zero in the n-input columns
# (a quarter of W), which take a separate small [x_t, 1] product instead (~25% fewer FLOPs per
# GRU step). At step 0, h_-1 = 0: only the [x_0, 1] rows are multiplied, and no gradient goes
# to h_-1. The elementwise update of each step is one call into fused_cells.c where that builds
# (forecasting.fused_cells), else a few in-place torch ops (`_TorchSteps`); both leave the same
# values in the same buffers. Gate layouts, parameters and results are nn.LSTM/GRU/RNN's (tests
# compare them to float precision, both ways).


_POOL = BufferPool()  # the kernel's large per-call buffers, reused across training steps


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place as 2 sigmoid(2x) - 1: this torch build's tanh kernel is ~2x slower (AVX2)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


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


class _TorchSteps:
    """A step's elementwise update as torch ops, under fused_cells.c's contract (see there):
    forward reads the product `pre` and writes the activations `a`, the state h (and LSTM c,
    tanh c) and `hm`, h for the next product; backward reads dh plus the product's part dh_m,
    writes dL/dpre and leaves dh for the next step (GRU: dh * z; LSTM/RNN: zero)."""

    def __init__(self, cell: str, like: torch.Tensor) -> None:  # like: [batch, hidden]
        self.cell, self.hid = cell, like.shape[1]
        self.ones, self.tmp = torch.ones_like(like), torch.empty_like(like)
        self.d_pre: torch.Tensor | None = None  # dL/dpre in the state's dtype, when d_pre's is not

    def _one_minus_square(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.ones, x, x, value=-1.0, out=out)  # 1 - x^2: tanh' from tanh

    @staticmethod
    def _sigmoid_grad(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(s, s, s, value=-1.0, out=out)  # s (1 - s): sigmoid' from sigmoid

    def forward(self, pre, a, h_prev, h, hm, c_prev, c, tc) -> None:
        hid = self.hid
        if self.cell == "lstm":
            a.copy_(pre)
            a[:, :2 * hid].sigmoid_()
            a[:, 3 * hid:].sigmoid_()
            i, f, g, o = a.chunk(4, 1)
            _tanh_(g)
            torch.mul(f, c_prev, out=c).addcmul_(i, g)
            torch.mul(o, _tanh_(tc.copy_(c)), out=h)
        elif self.cell == "gru":
            a.copy_(pre)
            rz = a[:, :2 * hid].sigmoid_()
            n = _tanh_(a[:, 3 * hid:].addcmul_(rz[:, :hid], a[:, 2 * hid:3 * hid]))
            torch.sub(h_prev, n, out=h).mul_(rz[:, hid:]).add_(n)  # n + z (h_prev - n)
        else:
            _tanh_(h.copy_(pre))
        hm.copy_(h)

    def backward(self, a, h_prev, h, c_prev, tc, dh, dh_m, dc, d_pre) -> None:
        if dh_m is not None:
            dh.add_(dh_m)
        dp = d_pre
        if d_pre.dtype != dh.dtype:
            if self.d_pre is None:
                self.d_pre = dh.new_empty(d_pre.shape)
            dp = self.d_pre
        if self.cell == "lstm":
            i, f, g, o = a.chunk(4, 1)
            di, df, dg, do = dp.chunk(4, 1)
            self._sigmoid_grad(o, out=do).mul_(dh).mul_(tc)
            dc.addcmul_(self._one_minus_square(tc, out=self.tmp).mul_(o), dh)
            self._sigmoid_grad(i, out=di).mul_(dc).mul_(g)
            self._sigmoid_grad(f, out=df).mul_(dc).mul_(c_prev)
            self._one_minus_square(g, out=dg).mul_(dc).mul_(i)
            dc.mul_(f)
            dh.zero_()
        elif self.cell == "gru":
            r, zg, n_h, n = a.chunk(4, 1)  # n_h: W_hn h + b_hn
            dr, dz, dn_h, dn = dp.chunk(4, 1)
            torch.sub(self.ones, zg, out=dn).mul_(dh).mul_(self._one_minus_square(n, out=self.tmp))
            torch.sub(h_prev, n, out=dz).mul_(dh).mul_(self._sigmoid_grad(zg, out=self.tmp))
            self._sigmoid_grad(r, out=dr).mul_(dn).mul_(n_h)
            torch.mul(dn, r, out=dn_h)
            dh.mul_(zg)
        else:
            self._one_minus_square(h, out=dp).mul_(dh)
            dh.zero_()
        if dp is not d_pre:
            d_pre.copy_(dp)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()  # None: NULL


class _FusedSteps:
    """`_TorchSteps`' contract, each update one call into fused_cells.c. The buffers are the
    layer's own: rows of `pre`, `a`, `d_pre` and the LSTM cells contiguous; h and hm rows
    `ldh` and `ldhm` apart."""

    def __init__(self, cell: str, kernels: dict, batch: int, hid: int, ldh: int, ldhm: int) -> None:
        self.cell, self.batch, self.hid, self.ldh, self.ldhm = cell, batch, hid, ldh, ldhm
        self.forward_kernel, self.backward_kernel = kernels[f"{cell}_forward"], kernels[f"{cell}_backward"]

    def forward(self, pre, a, h_prev, h, hm, c_prev, c, tc) -> None:
        b, hid, ldh, ldhm = self.batch, self.hid, self.ldh, self.ldhm
        if self.cell == "lstm":
            self.forward_kernel(b, hid, pre.data_ptr(), a.data_ptr(), c_prev.data_ptr(), c.data_ptr(),
                                tc.data_ptr(), h.data_ptr(), ldh, hm.data_ptr(), ldhm)
        elif self.cell == "gru":
            self.forward_kernel(b, hid, pre.data_ptr(), a.data_ptr(), h_prev.data_ptr(), h.data_ptr(), ldh,
                                hm.data_ptr(), ldhm)
        else:
            self.forward_kernel(b, hid, pre.data_ptr(), h.data_ptr(), ldh, hm.data_ptr(), ldhm)

    def backward(self, a, h_prev, h, c_prev, tc, dh, dh_m, dc, d_pre) -> None:
        b, hid, ldh, ldd = self.batch, self.hid, self.ldh, d_pre.stride(0)
        if self.cell == "lstm":
            self.backward_kernel(b, hid, a.data_ptr(), c_prev.data_ptr(), tc.data_ptr(), dh.data_ptr(), _ptr(dh_m),
                                 dc.data_ptr(), d_pre.data_ptr(), ldd)
        elif self.cell == "gru":
            self.backward_kernel(b, hid, a.data_ptr(), h_prev.data_ptr(), ldh, dh.data_ptr(), _ptr(dh_m),
                                 d_pre.data_ptr(), ldd)
        else:
            self.backward_kernel(b, hid, h.data_ptr(), ldh, dh.data_ptr(), _ptr(dh_m), d_pre.data_ptr(), ldd)


def _steps(cell: str, state: torch.Tensor, mm_dtype: torch.dtype, ldhm: int) -> _TorchSteps | _FusedSteps:
    """The fused kernels where they are built for these dtypes, else torch ops. state: [batch, hidden]."""
    kernels = fused_cells.kernels_for(state.dtype, mm_dtype) if state.device.type == "cpu" else None
    if kernels is None:
        return _TorchSteps(cell, state)
    return _FusedSteps(cell, kernels, state.shape[0], state.shape[1], state.stride(0), ldhm)


_CELL_NUMBERS = {"lstm": 0, "gru": 1, "rnn": 2}  # fused_cells.c's


class _FusedSequence:
    """A layer's whole time loop, forward or backward, in one call into fused_cells.c: the same
    products (through the BLAS gemm torch's own products call) and the same elementwise updates
    as `_forward_steps` / `_backward_steps`, without coming back to Python between steps (GRU
    float32 training 6% faster at batch 512, hidden 64, window 36; 13% with the weight gradients
    taken per step, which only this loop does)."""

    def __init__(self, cell: str, kernels: tuple, t_len: int, batch: int, n_in: int, hid: int) -> None:
        self.gemm, self.forward_kernel, self.backward_kernel = kernels
        self.shape = (_CELL_NUMBERS[cell], t_len, batch, n_in, hid)

    def forward(self, wm, zm, am, pre, hs, cells) -> None:
        c, tc = (cells[0], cells[1]) if cells is not None else (None, None)
        self.forward_kernel(self.gemm, *self.shape, wm.data_ptr(), zm.data_ptr(), am.data_ptr(), _ptr(pre),
                            hs.data_ptr(), _ptr(c), _ptr(tc))

    def backward(self, wm, zm, pre, hs, cells, d_out, dh, dh_m, dc, d_pre, d_w, d_x) -> None:
        c, tc = (cells[0], cells[1]) if cells is not None else (None, None)
        strides = d_out.stride() if d_out is not None else (0, 0, 0)  # any layout: read element by element
        self.backward_kernel(self.gemm, *self.shape, wm.data_ptr(), zm.data_ptr(), _ptr(pre), hs.data_ptr(), _ptr(c),
                             _ptr(tc), _ptr(d_out), *strides, dh.data_ptr(), dh_m.data_ptr(), _ptr(dc),
                             d_pre.data_ptr(), d_w.data_ptr(), _ptr(d_x))


def _fused_sequence(cell: str, x: torch.Tensor, w: torch.Tensor, hid: int,
                    mm_dtype: torch.dtype) -> _FusedSequence | None:
    """The one-call loop where fused_cells.c built and torch's BLAS gemm was found for x's dtype
    (float32, float64; not bf16-mixed, whose products go through torch), else None. The C loop
    writes the gradients of the packed weights `w` in x's dtype: weights of another dtype take
    the Python loop."""
    if x.device.type != "cpu" or w.dtype != x.dtype:
        return None
    kernels = fused_cells.sequence_kernels_for(x.dtype, mm_dtype)
    if kernels is None:
        return None
    t_len, batch, n_in = x.shape
    return _FusedSequence(cell, kernels, t_len, batch, n_in, hid)


def _forward_steps(cell, wm, zm, am, pre, hs, cells, n_in, mm_dtype):
    """The forward time loop in Python: per step the products as torch ops and the update through
    `_steps`. Returns (steps, the per-step views) for `_backward_steps`."""
    t_len, k, hid = hs.shape[0] - 1, n_in + 1, hs.shape[2]
    gates, rec = _gates(cell, hid)
    steps = _steps(cell, hs[0], mm_dtype, ldhm=k + hid)
    # Per-step views made once (one unbind each, not ~10 indexing calls in every step).
    zm_t, zx_t, hm_t, hs_t = zm.unbind(0), zm[:, :, :k].unbind(0), zm[:, :, k:].unbind(0), hs.unbind(0)
    a_t = pre.unbind(0) if pre is not None else (None,) * t_len
    c_t, tc_t = (cells[0].unbind(0), cells[1].unbind(0)) if cells is not None else ((None,) * (t_len + 1),) * 2
    w_x, w_rec, w_x_rest = wm[:k], wm[:, :rec], wm[:k, rec:]
    # GRU: W's h rows are zero in the n-input columns. In float, a separate small product for
    # those columns is faster than multiplying the zeros; in bfloat16 one full product is
    # (small products cost more per call than their FLOPs: 48 against 58 us at batch 512,
    # hidden 64 here, and 167 against 139 us in float32).
    split = rec < gates and mm_dtype in (torch.float32, torch.float64)
    for t in range(t_len):
        if not t:  # h_-1 = 0: the x and bias rows only
            torch.mm(zx_t[t], w_x, out=am)
        elif split:
            torch.mm(zm_t[t], w_rec, out=am[:, :rec])
            torch.mm(zx_t[t], w_x_rest, out=am[:, rec:])
        else:
            torch.mm(zm_t[t], wm, out=am)
        steps.forward(am, a_t[t], hs_t[t], hs_t[t + 1], hm_t[t + 1], c_t[t], c_t[t + 1], tc_t[t + 1])
    return steps, (a_t, hs_t, c_t, tc_t)  # the backward walks the same rows


def _backward_steps(steps, step_views, w_h, d_out, dh, dh_m, dc, d_pre, rec) -> None:
    """The backward time loop in Python, filling every step's dL/dpre. w_h: [rec, hidden], the
    recurrent rows of W transposed; d_out: every step's dL/dh, or None (only the last h, in dh)."""
    a_t, hs_t, c_t, tc_t = step_views
    t_len = len(hs_t) - 1
    d_pre_t, d_rec_t = d_pre.unbind(0), d_pre[:, :, :rec].unbind(0)
    for t in range(t_len - 1, -1, -1):
        if d_out is not None:
            dh += d_out[t]
        steps.backward(a_t[t], hs_t[t], hs_t[t + 1], c_t[t], tc_t[t + 1], dh, dh_m if t < t_len - 1 else None,
                       dc, d_pre_t[t])
        if not t:  # h_-1 = 0: no state before step 0 to pass dh to
            break
        torch.mm(d_rec_t[t], w_h, out=dh_m)  # [batch, rec] @ [rec, hidden]


def _weight_and_input_grads(d_pre, zm, w, wm, n_in, rec, input_grad):
    """After `_backward_steps`: every step's weight and bias gradients in one product (step 0's h
    rows are zero in Z) and, where x needs one, its gradient. Returns (dL/dW, dL/dx or None)."""
    t_len, batch, gates = d_pre.shape
    k = n_in + 1
    z_all, d_all = zm[:t_len].reshape(t_len * batch, zm.shape[2]), d_pre.view(t_len * batch, gates)
    if rec < gates:  # GRU: all but W's zero block
        d_w = w.new_zeros(w.shape)
        d_w[:, :rec] = z_all.t() @ d_all[:, :rec]
        d_w[:k, rec:] = z_all[:, :k].t() @ d_all[:, rec:]
    else:
        d_w = (z_all.t() @ d_all).to(w.dtype)
    d_x = (d_all @ wm[:n_in].t()).to(w.dtype).view(t_len, batch, n_in) if input_grad else None
    return d_w, d_x


class _SequenceLayer(torch.autograd.Function):
    """One nn.LSTM/GRU/RNN layer (bias, tanh, zero initial state) over time-major x [window,
    batch, input]: every h_t [window, batch, hidden], or with `last_only` the last [batch, hidden].
    The products take their inputs in `mm_dtype` (x's dtype, or bfloat16 for bf16-mixed): Z and W
    are kept in it (zm, wm), as is dL/dpre; state, activations and the gradients returned keep x's."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor, cell: str, last_only: bool,
                mm_dtype: torch.dtype) -> torch.Tensor:
        t_len, batch, n_in = x.shape
        hid, k = w_hh.shape[1], n_in + 1  # Z_t's first k columns, [x_t, 1], see every gate
        gates = _gates(cell, hid)[0]
        w = _pack(cell, w_ih, w_hh, b_ih, b_hh)  # [input + 1 + hidden, gates]
        wm = w.to(mm_dtype)
        # The large buffers come from a pool and go back after the backward pass (forecasting.buffers).
        zm = _POOL.take(t_len + 1, batch, k + hid, dtype=mm_dtype, device=x.device)  # row t: [x_t, 1, h_t-1]
        zm[:t_len, :, :n_in] = x
        zm[:, :, n_in] = 1.0
        zm[0, :, k:] = 0.0
        # The state: h_t-1 in row t, written by step t - 1. Every step of it is the output unless
        # last_only, which returns a copy of the last row, so the pool may have it back.
        hs = (_POOL.take(t_len + 1, batch, hid, dtype=x.dtype, device=x.device) if last_only
              else x.new_empty(t_len + 1, batch, hid))
        hs[0] = 0.0
        pre = None  # each step's activations, for the backward (RNN's needs only h)
        if cell != "rnn":
            pre = _POOL.take(t_len, batch, gates, dtype=x.dtype, device=x.device)
        cells = None  # LSTM: [c | tanh c, window + 1 (c_-1 = 0 first), batch, hidden]
        if cell == "lstm":
            cells = _POOL.take(2, t_len + 1, batch, hid, dtype=x.dtype, device=x.device)
            cells[:, 0] = 0.0
        am = x.new_empty(batch, gates, dtype=mm_dtype)  # one step's product: its pre-activations
        sequence = _fused_sequence(cell, x, w, hid, mm_dtype)
        if sequence is not None:
            sequence.forward(wm, zm, am, pre, hs, cells)
            ctx.steps = ctx.step_views = None
        else:
            ctx.steps, ctx.step_views = _forward_steps(cell, wm, zm, am, pre, hs, cells, n_in, mm_dtype)
        ctx.cell, ctx.n_in, ctx.last_only, ctx.sequence = cell, n_in, last_only, sequence
        ctx.w, ctx.wm, ctx.zm, ctx.hs, ctx.pre, ctx.cells = w, wm, zm, hs, pre, cells
        return hs[-1].clone() if last_only else hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cell, n_in, w, wm, zm, hs, pre, cells = ctx.cell, ctx.n_in, ctx.w, ctx.wm, ctx.zm, ctx.hs, ctx.pre, ctx.cells
        if zm is None:
            raise RuntimeError("the CPU training kernel's backward ran twice (retain_graph): its buffers are gone")
        t_len, batch, hid = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        k = n_in + 1
        gates, rec = _gates(cell, hid)
        # What dL/dh_t the loop knows; row-major, as the fused kernels read it (d_out may be strided).
        dh = d_out.clone(memory_format=torch.contiguous_format) if ctx.last_only else hs.new_zeros(batch, hid)
        dh_m = zm.new_empty(batch, hid)  # the recurrent product's part of dL/dh_t
        dc = hs.new_zeros(batch, hid) if cell == "lstm" else None
        d_out = None if ctx.last_only else d_out
        if ctx.sequence is not None:  # the weight and input gradients taken step by step, in one call
            d_pre = zm.new_empty(batch, gates)  # one step's dL/dpre
            d_w = w.new_zeros(w.shape)
            x_grad = w.new_empty(t_len, batch, n_in) if ctx.needs_input_grad[0] else None
            ctx.sequence.backward(wm, zm, pre, hs, cells, d_out, dh, dh_m, dc, d_pre, d_w, x_grad)
        else:
            d_pre = _POOL.take(t_len, batch, gates, dtype=zm.dtype, device=zm.device)  # every step's dL/dpre
            _backward_steps(ctx.steps, ctx.step_views, wm[k:, :rec].t(), d_out, dh, dh_m, dc, d_pre, rec)
            d_w, x_grad = _weight_and_input_grads(d_pre, zm, w, wm, n_in, rec, ctx.needs_input_grad[0])
            _POOL.give(d_pre)
        grads = _unpack(cell, d_w, n_in, hid)  # new tensors: none is a view of a pooled buffer
        _POOL.give(zm, pre, cells, hs if ctx.last_only else None)
        ctx.zm = ctx.hs = ctx.pre = ctx.cells = ctx.steps = ctx.step_views = None
        return (x_grad, *grads, None, None, None)


def sequence_kernel(rnn: nn.RNNBase, cell: str, x: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    """`rnn(x)[0]` from a zero state, for batch-first x, through `_SequenceLayer` (CPU): every
    step's output [batch, window, hidden], or with `last_only` the last one [batch, hidden].
    Float32 input takes its products in the precision `matmul_precision` set (float32 by default)."""
    mm_dtype = _MATMUL_DTYPE.get() if x.dtype == torch.float32 else x.dtype
    seq = x.transpose(0, 1)  # [window, batch, features]
    for k in range(rnn.num_layers):
        if k and rnn.dropout and rnn.training:  # nn.RNNBase drops between layers only
            seq = F.dropout(seq, rnn.dropout, training=True)
        top = k == rnn.num_layers - 1
        seq = _SequenceLayer.apply(seq, getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}"),
                                   getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}"), cell,
                                   last_only and top, mm_dtype)
    return seq if last_only else seq.transpose(0, 1)


# The products' precision in CPU training, for the fit in progress (a context variable: Prefect
# task threads and Dask workers each see their own). "bf16-mixed" runs them on bfloat16 copies of
# their float32 inputs: 3-4x faster products where the CPU multiplies bfloat16 natively
# (avx512_bf16, AMX). Their outputs (pre-activations, dL/dh's recurrent part, the weight and input
# gradients) come back rounded to bfloat16 (0.4% relative) and are widened to float32; state,
# activations, the weights themselves and Adam stay float32.
PRECISIONS = {"float32": torch.float32, "bf16-mixed": torch.bfloat16}
_MATMUL_DTYPE: ContextVar[torch.dtype] = ContextVar("matmul_dtype", default=torch.float32)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, the CPU training kernel takes its products in `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` ({precision!r}) is unknown; known: {list(PRECISIONS)}")
    token = _MATMUL_DTYPE.set(PRECISIONS[precision])
    try:
        yield
    finally:
        _MATMUL_DTYPE.reset(token)
