"""EMA of weights: the update rule by hand, warm-up, swapping, saving."""

import pytest
import torch
import torch.nn as nn

from minildm.ema import EMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def set_params_(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_update_rule_by_hand():
    model = small_model()
    w0 = model[0].weight.detach().clone()
    ema = EMA(model, decay=0.9)
    set_params_(model, 1.0)
    ema.update(model)
    torch.testing.assert_close(ema.params["0.weight"], 0.9 * w0 + 0.1 * 1.0)
    set_params_(model, -2.0)
    ema.update(model)
    torch.testing.assert_close(ema.params["0.weight"], 0.9 * (0.9 * w0 + 0.1) + 0.1 * -2.0)
    assert ema.num_updates == 2


def test_buffers_are_copied_not_averaged():
    model = small_model()
    ema = EMA(model, decay=0.99)
    model.train()
    model(torch.randn(8, 3))  # moves the BatchNorm running statistics
    ema.update(model)
    torch.testing.assert_close(ema.buffers["1.running_mean"], model[1].running_mean)
    assert ema.buffers["1.num_batches_tracked"].item() == 1


def test_warmup_decay():
    model = small_model()
    ema = EMA(model, decay=0.999, warmup=True)
    expected = [min(0.999, (1 + n) / (10 + n)) for n in range(4)]  # 0.1, 2/11, 3/12, 4/13
    assert expected[0] == pytest.approx(0.1)
    value = ema.params["2.bias"].clone()
    for n in range(4):
        assert ema.current_decay() == pytest.approx(expected[n])
        set_params_(model, float(n))
        ema.update(model)
        value = expected[n] * value + (1 - expected[n]) * n
    torch.testing.assert_close(ema.params["2.bias"], value)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999  # the cap
    assert EMA(model, decay=0.5, warmup=False).current_decay() == 0.5


def test_swapped_restores_weights_even_on_error():
    model = small_model()
    ema = EMA(model, decay=0.5)
    set_params_(model, 3.0)
    ema.update(model)  # ema = (w0 + 3) / 2
    train_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model) as m:
        assert m is model
        torch.testing.assert_close(model[0].weight, ema.params["0.weight"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, train_weights[k])
    with pytest.raises(RuntimeError):
        with ema.swapped(model):
            raise RuntimeError("sampling failed")
    torch.testing.assert_close(model[0].weight, train_weights["0.weight"])


def test_copy_to_and_state_dict_roundtrip():
    model = small_model()
    ema = EMA(model, decay=0.9, warmup=True)
    set_params_(model, 1.0)
    ema.update(model)
    other = EMA(small_model(), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.warmup, other.num_updates) == (0.9, True, 1)
    target = small_model()
    other.copy_to(target)
    torch.testing.assert_close(target[2].weight, ema.params["2.weight"])
    with pytest.raises(KeyError):
        EMA(nn.Linear(3, 4)).load_state_dict(ema.state_dict())
