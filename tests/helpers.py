"""Shared test helpers: one comparison that reports where and how badly tensors differ."""
from __future__ import annotations

import torch


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str | None:
    """None if |actual - expected| <= atol + rtol·|expected| everywhere, else a report: max error, its
    position, and NaN/inf counts of both tensors."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad_a = int((~torch.isfinite(a)).sum())
    bad_e = int((~torch.isfinite(e)).sum())
    if bad_a or bad_e:
        return f"non-finite values: actual {bad_a} (NaN {int(a.isnan().sum())}), expected {bad_e}"
    if a.numel() == 0:
        return None
    err = (a - e).abs()
    excess = err - (atol + rtol * e.abs())
    if bool((excess <= 0).all()):
        return None
    idx = int(excess.flatten().argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
    return (f"max error {float(err.max()):.3e} (worst over tolerance at {pos}: actual {float(a[pos]):.6g}, "
            f"expected {float(e[pos]):.6g}); {int((excess > 0).sum())}/{a.numel()} elements out of "
            f"atol={atol:g} rtol={rtol:g}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    report = describe_mismatch(actual, expected, atol, rtol)
    assert report is None, f"{name}: {report}"


def assert_close_lowp(actual: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, atol: float,
                      name: str = "tensor"):
    """Low-precision rule (flash-attention's): |fused − ref64| ≤ 2·|torch_same_dtype − ref64| + atol, where
    torch_same_dtype is plain torch's answer in the same low precision."""
    a, t, r = (v.detach().double().cpu() for v in (actual, torch_same_dtype, ref64))
    assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(r.shape)}"
    assert bool(torch.isfinite(a).all()), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    fused_err = float((a - r).abs().max()) if a.numel() else 0.0
    torch_err = float((t - r).abs().max()) if a.numel() else 0.0
    assert fused_err <= 2 * torch_err + atol, (
        f"{name}: max error vs fp64 {fused_err:.3e} > 2 × torch's own {torch_err:.3e} + atol {atol:g}")
