"""Soak: a long ranger run with groups frozen and unfrozen and the lr driven by a torch scheduler. Nothing may grow
without bound (state tensors, their bytes, slow weights, compiled kernels) and the weights must stay finite.
Slow: `pytest --runslow tests/test_soak.py`."""
import pytest, torch
from torch import nn
import fastopt
import fastopt.engine.plan as plan

def _state_size(opt):
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    slow = [s for g in (opt.slow_weights or []) for s in g]
    return dict(tensors=len(tensors), bytes=sum(t.numel() * t.element_size() for t in tensors),
                slow=len(slow), slow_bytes=sum(t.numel() * t.element_size() for t in slow),
                entries=sum(len(s) for s in opt.state.values()), kernels=len(plan._kernels))

@pytest.mark.slow
def test_ranger_soak_10k_steps_with_freezing_and_a_scheduler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = fastopt.ranger([list(model[:2].parameters()), list(model[2:4].parameters()), list(model[4].parameters())],
                         lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1000)
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(10, 1, generator=g)
    sizes, lrs = {}, set()
    for i in range(10_000):
        if i % 500 == 0: opt.freeze_to((i // 500) % 3)      # cycle: all trainable, first group frozen, two frozen
        x = torch.randn(64, 10, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x @ w_true)
        loss.backward(); opt.step(); sched.step()
        lrs.add(round(opt.param_groups[0]['lr'], 8))
        if i in (1499, 9999): sizes[i] = _state_size(opt)    # after every freezing pattern has been seen once
    assert sizes[1499] == sizes[9999], sizes
    assert opt.count == 10_000 and len(lrs) > 100            # the scheduler really moved the lr
    assert all(p.isfinite().all() for p in model.parameters())
    assert loss.item() < 0.5, loss.item()
