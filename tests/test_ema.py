import torch
from torch import nn

from utils.ema import ModelEma


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_moves_towards_the_weights_by_the_decay():
    model = _model()
    ema = ModelEma(model, decay=0.9, warmup=False)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.9 * before + 0.1 * model[0].weight)


def test_integer_buffers_are_copied_not_averaged():
    model = _model()
    ema = ModelEma(model, decay=0.9, warmup=False)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert ema.module[1].num_batches_tracked.item() == 7


def test_warmup_starts_with_a_small_decay_and_reaches_the_target():
    ema = ModelEma(_model(), decay=0.999, warmup=True)
    assert ema.current_decay() == 0.1
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999


def test_state_dict_round_trip_restores_weights_and_update_count():
    model = _model()
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update(model)
    restored = ModelEma(_model(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)
    assert not restored.module[0].weight.requires_grad
