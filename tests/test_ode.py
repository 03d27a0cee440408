"""The ODE solvers against closed-form solutions: dy/ds = cos(s) y, y = exp(sin s)."""

import math

import pytest
import torch

from minildm.ode import odeint


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solver_orders(method, order):
    y0 = torch.ones(2, 1, dtype=torch.float64)

    def f(s, y):
        return math.cos(s) * y

    errors = [abs(float(odeint(f, y0, 0.0, 2.0, method=method, steps=n)[0][0, 0]) - math.exp(math.sin(2.0)))
              for n in (20, 40)]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("s0,s1", [(0.0, 10.0), (10.0, 0.0)])
def test_rk45_meets_its_tolerance(s0, s1):
    y0 = torch.ones(3, 1, dtype=torch.float64)
    y, nfe = odeint(lambda s, y: math.cos(s) * y, y0, s0, s1, method="rk45", rtol=1e-8, atol=1e-8)
    assert float(y[0, 0]) == pytest.approx(math.exp(math.sin(s1) - math.sin(s0)), rel=1e-6)
    assert nfe < 2000
