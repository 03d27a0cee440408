"""ODE solvers in torch: fixed-step Euler, Heun and RK4, and adaptive Dormand-Prince RK45.

`odeint(f, y, s0, s1, method=...)` integrates dy/ds = f(s, y) for a batched state y (B, N)
and returns the final state with the number of evaluations of f. The likelihood of the
probability-flow ODE (`minildm.likelihood.ode_nll`) is its user; scipy is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

OdeMethod = Literal["euler", "heun", "rk4", "rk45"]

# Dormand-Prince 5(4) tableau (Dormand & Prince 1980; Hairer, Norsett & Wanner, table II.5.2)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def odeint(f: Callable[[float, Tensor], Tensor], y: Tensor, s0: float, s1: float, *,
           method: OdeMethod = "rk45", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
           progress: bool = False) -> tuple[Tensor, int]:
    """Integrate dy/ds = f(s, y) from s0 to s1; returns (y(s1), number of evaluations of f).

    Fixed steps: "euler", "heun" (2nd order), "rk4" (classic 4th order), `steps` uniform steps.
    "rk45": adaptive Dormand-Prince 5(4) with local extrapolation and FSAL. A step is accepted
    when max over samples of the RMS of err / (atol + rtol max(|y|, |y_new|)) is <= 1, so every
    sample in the batch meets the tolerance (Hairer et al., section II.4).
    """
    nfe = 0

    def F(s: float, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return f(s, y)

    if method != "rk45":
        h = (s1 - s0) / steps
        for i in tqdm(range(steps), disable=not progress, desc=f"ODE {method}"):
            s = s0 + i * h
            if method == "euler":
                y = y + h * F(s, y)
            elif method == "heun":
                k1 = F(s, y)
                k2 = F(s + h, y + h * k1)
                y = y + h / 2 * (k1 + k2)
            elif method == "rk4":
                k1 = F(s, y)
                k2 = F(s + h / 2, y + h / 2 * k1)
                k3 = F(s + h / 2, y + h / 2 * k2)
                k4 = F(s + h, y + h * k3)
                y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            else:
                raise ValueError(f"method must be one of euler, heun, rk4, rk45; got {method!r}")
        return y, nfe

    def error_norm(err: Tensor, y: Tensor, y_new: Tensor) -> float:
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        return float((err / scale).pow(2).mean(1).sqrt().max())

    span = s1 - s0
    k = F(s0, y)
    # initial step (Hairer et al., II.4): small enough that an Euler step changes y by ~1% of its scale
    scale0 = atol + rtol * y.abs()
    d0, d1 = float((y / scale0).pow(2).mean().sqrt()), float((k / scale0).pow(2).mean().sqrt())
    h = abs(span) * 1e-3 if d0 < 1e-5 or d1 < 1e-5 else min(0.01 * d0 / d1, abs(span))
    h = math.copysign(h, span)
    s = s0
    bar = tqdm(total=abs(span), disable=not progress, desc="ODE rk45")
    while (s1 - s) * math.copysign(1, span) > 1e-12 * abs(span):
        h = math.copysign(min(abs(h), abs(s1 - s)), span)
        ks = [k]
        for i in range(1, 7):
            y_i = y + h * sum(a * kj for a, kj in zip(_DP_A[i], ks))
            ks.append(F(s + _DP_C[i] * h, y_i))
        y_new = y + h * sum(b * kj for b, kj in zip(_DP_B5, ks))  # ks[6] = f(s + h, y_new): FSAL
        err = h * sum((b5 - b4) * kj for b5, b4, kj in zip(_DP_B5, _DP_B4, ks))
        e = error_norm(err, y, y_new)
        if e <= 1.0:
            s, y, k = s + h, y_new, ks[6]
            bar.update(abs(h))
        h = h * min(10.0, max(0.2, 0.9 * (e + 1e-16) ** -0.2))
    bar.close()
    return y, nfe
