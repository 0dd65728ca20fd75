r"""LoRA on grouped expert weights in plain PyTorch: the CPU path of ``fastlora.lora_experts``, free of deltas.

The same forward/backward signature as the Triton launch helpers (``fastlora.kernels.moe``): rows of x sorted
by expert, expert e owning rows ``offsets[e-1] : offsets[e]``; W (E, N, K), A (E, r, K), B (E, N, r), bias (E, N),
any strides. Per expert, with in-place ``addmm_`` into slices of one output, so nothing (S, N) is allocated
twice and no (E, N, K) or (N, K) tensor exists unless dW is asked for::

    h_e = x_e A_eᵀ                   y_e = x_e W_eᵀ + b_e + s · h_e B_eᵀ
    dh_e = s · dY_e B_e              dx_e = dY_e W_e + dh_e A_e
    dA_e = dh_eᵀ x_e                 dB_e = s · dY_eᵀ h_e          db_e = Σ_rows dY_e        dW_e = dY_eᵀ x_e

With fp32 adapters on a half-precision x, the rank-r products run in fp32 (h, the branch, dh, dA, dB), as PEFT
computes its LoRA branches; h is saved in fp32 then, else in x's dtype. The offsets are read on the host once
per call (one ``tolist``): the CPU path loops over the experts that have rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["experts_forward", "experts_backward", "lo_dtype", "spans"]


def lo_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-r products: fp32 when either side is fp32 (fp32 adapters on a half base), else x's."""
    return torch.float32 if torch.float32 in (dtype, adapter_dtype) else dtype


def spans(offsets: Tensor):
    """(expert, start, end) of every expert with rows."""
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            yield e, start, end
        start = max(start, end)


def _grouped_rows(x: Tensor, w: Tensor, offsets: Tensor):
    """x (S, K) times each expert's w[e] (E, K, J) for that expert's rows, by one torch ``grouped_mm`` call; None
    where it cannot take the operands (``_grouped_ok``). Rows past the last offset are left unwritten."""
    if not offsets.numel() or not _grouped_ok(x, w):
        return None
    return torch.nn.functional.grouped_mm(x, w, offs=offsets.to(torch.int32))


def experts_forward(x, weight, lora_A, lora_B, bias, offsets, scaling, store_h=True):
    """(y, h): y (S, N) in x's dtype, h (S, r) in the rank dtype (None unless ``store_h``)."""
    S, N, r = x.shape[0], weight.shape[1], lora_A.shape[1]
    lo = lo_dtype(x.dtype, lora_A.dtype)
    y = x.new_empty(S, N)
    if S and not offsets.numel():
        raise ValueError("lora_experts: rows given but no expert")
    h, shrunk = None, False
    if r:
        x_lo = x.to(lo)
        A_t = lora_A.to(lo).transpose(1, 2)  # (E, K, r)
        B_t = lora_B.to(lo).contiguous().transpose(1, 2)  # (E, r, N); PEFT's B view has no unit stride: one copy
        h = _grouped_rows(x_lo, A_t, offsets)  # the shrink of every row in one call where torch can
        shrunk = h is not None
    if h is None:
        h = x.new_empty(S, r, dtype=lo)
    for e, a, b in spans(offsets):
        xs, ys = x[a:b], y[a:b]
        if bias is not None:
            torch.addmm(bias[e], xs, weight[e].t(), out=ys)
        else:
            torch.mm(xs, weight[e].t(), out=ys)
        if not r:  # a projection without LoRA
            continue
        hs = h[a:b] if shrunk else torch.mm(x_lo[a:b], A_t[e], out=h[a:b])
        if lo == y.dtype:
            ys.addmm_(hs, B_t[e], alpha=scaling)
        else:  # the fp32 branch, added once
            ys.add_(torch.mm(hs, B_t[e]).mul_(scaling))
    _zero_unrouted(y, offsets)
    return y, (h if store_h else None)


def _zero_unrouted(t: Tensor, offsets: Tensor) -> None:
    """Rows past the last offset (no expert owns them) are zeros, not uninitialized memory."""
    last = int(offsets[-1]) if offsets.numel() else 0
    if last < t.shape[0]:
        t[last:].zero_()


def _grouped_ok(*ts) -> bool:
    """torch's grouped_mm takes these (2-D × 2-D, groups along the rows): fp32/fp16/bf16 on the CPU, strides and
    data 16-byte aligned. It runs the per-expert products of dA and dB in one call."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    for t in ts:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.device.type != "cpu":
            return False
        es = t.element_size()
        inner = t.shape[-2:] if t.dim() == 3 else t.shape[-1:]  # the dims it does not group along
        if (not t.numel() or t.data_ptr() % 16 or min(t.stride()) != 1 or any(st * es % 16 for st in t.stride() if st != 1)
                or any(n * es % 16 for n in inner)):
            return False
    return True


def _rank_grad(out, p, q, offsets, scaling):
    """out[e] = scaling · P_eᵀ Q_e for every expert (zeros where it has no rows), P (S, N), Q (S, J)."""
    if _grouped_ok(p, q) and p.dtype == q.dtype and offsets.numel():
        out.copy_(torch.nn.functional.grouped_mm(p.t(), q, offs=offsets.to(torch.int32)).mul_(scaling))
        return out
    out.zero_()
    for e, a, b in spans(offsets):
        torch.addmm(out[e], p[a:b].t(), q[a:b], beta=0, alpha=scaling, out=out[e])
    return out


def experts_backward(dy, x, weight, lora_A, lora_B, h, offsets, scaling, needs):
    """(dx, dW, dA, dB, dbias) for ``needs`` = (x, weight, lora_A, lora_B, bias) flags; None where not needed.
    Experts without rows get zero gradients."""
    need_x, need_w, need_a, need_b, need_bias = needs
    E, N, K = weight.shape
    r = lora_A.shape[1]
    lo = h.dtype
    dy_lo = dy.to(lo)
    dx = x.new_empty(x.shape) if need_x else None
    dh = None  # dY_e B_e (unscaled), (S, r)
    if (need_x or need_a) and r:
        B = lora_B.to(lo).contiguous()  # (E, N, r); PEFT's B view has no unit stride: one copy
        dh = _grouped_rows(dy_lo, B, offsets)
        if dh is None:
            dh = x.new_empty(x.shape[0], r, dtype=lo)
            for e, a, b in spans(offsets):
                torch.mm(dy_lo[a:b], B[e], out=dh[a:b])
    if need_x:
        A = lora_A.to(lo)
        for e, a, b in spans(offsets):
            dxs = torch.mm(dy[a:b], weight[e], out=dx[a:b])
            if dh is None:
                continue
            if lo == dxs.dtype:
                dxs.addmm_(dh[a:b], A[e], alpha=scaling)
            else:
                dxs.add_(torch.mm(dh[a:b], A[e]).mul_(scaling))
        _zero_unrouted(dx, offsets)
    da = db = dw = dbias = None
    if need_a and not r:
        da = torch.zeros(E, 0, K, dtype=lora_A.dtype, device=x.device)
    elif need_a:
        da = _rank_grad(torch.empty(E, r, K, dtype=lora_A.dtype, device=x.device), dh, x.to(lo), offsets, scaling)
    if need_b:
        db = _rank_grad(torch.empty(E, N, r, dtype=lora_B.dtype, device=x.device), dy_lo, h, offsets, scaling)
    if need_w:
        dw = _rank_grad(torch.empty(E, N, K, dtype=weight.dtype, device=x.device), dy, x, offsets, 1.0)
    if need_bias:
        dbias = torch.zeros(E, N, dtype=torch.float32, device=x.device)
        for e, a, b in spans(offsets):
            dbias[e] = dy[a:b].sum(0, dtype=torch.float32)
    return dx, dw, da, db, dbias
