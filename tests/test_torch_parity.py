"""fastopt against torch.optim where the algorithms coincide: same weights, same random gradients, 100 steps,
two parameter groups. Each case states the hyper-parameter mapping and, where the formulas differ in detail,
how (so that the tolerance is justified).

| fastopt                                   | torch.optim                                                   |
|-------------------------------------------|---------------------------------------------------------------|
| SGD(lr, mom, wd, decouple_wd=False)       | SGD(lr, momentum=mom, weight_decay=wd, dampening=0)          |
| Adam(lr, mom, sqr_mom, eps, wd)           | AdamW(lr, betas=(mom, sqr_mom), eps, weight_decay=wd)         |
| Adam(..., decouple_wd=False)              | Adam(lr, betas=(mom, sqr_mom), eps, weight_decay=wd)          |
| RMSProp(lr, sqr_mom, eps, wd, mom=0, decouple_wd=False) | RMSprop(lr, alpha=sqr_mom, eps, weight_decay=wd)  |
| RAdam(lr, mom, sqr_mom, eps, wd, decouple_wd) | RAdam(lr, betas, eps, weight_decay=wd, decoupled_weight_decay=decouple_wd) |

Where they differ:
- Adam: fastopt divides by sqrt(v / (1-β2^t)) + eps, torch by sqrt(v)/sqrt(1-β2^t) + eps: the same number up to
  rounding.
- RAdam: torch adds eps to sqrt(v) before dividing by sqrt(1-β2^t), i.e. its eps is scaled by 1/sqrt(1-β2^t);
  with eps=1e-8 and gradients of order 1 the difference is far below the tolerance.
- RMSProp with momentum does not coincide: fastopt (like fastai) keeps momentum of the raw gradient and divides
  it by sqrt(v)+eps; torch keeps momentum of the already divided step. Only mom=0 is compared.
- SGD with true (decoupled) weight decay has no torch counterpart; torch's weight_decay is L2.
"""
import pytest, torch
import fastopt
from helpers import SHAPES, make_groups, gradient_stream, run

N_STEPS = 100
LRS = [3e-3, 1e-2]

def _torch_groups(groups, **extra): return [{'params': g, 'lr': lr, **extra} for g, lr in zip(groups, LRS)]

CASES = {
    'SGD-L2':           (lambda ps: fastopt.SGD(ps, lr=LRS, mom=0.9, wd=1e-2, decouple_wd=False),
                         lambda ps: torch.optim.SGD(_torch_groups(ps), momentum=0.9, weight_decay=1e-2)),
    'SGD-plain':        (lambda ps: fastopt.SGD(ps, lr=LRS),
                         lambda ps: torch.optim.SGD(_torch_groups(ps))),
    'AdamW':            (lambda ps: fastopt.Adam(ps, lr=LRS, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=1e-2),
                         lambda ps: torch.optim.AdamW(_torch_groups(ps), betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)),
    'AdamW-fastai-defaults': (lambda ps: fastopt.Adam(ps, lr=LRS),
                         lambda ps: torch.optim.AdamW(_torch_groups(ps), betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2)),
    'Adam-L2':          (lambda ps: fastopt.Adam(ps, lr=LRS, wd=1e-2, decouple_wd=False),
                         lambda ps: torch.optim.Adam(_torch_groups(ps), betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2)),
    'RMSprop':          (lambda ps: fastopt.RMSProp(ps, lr=LRS, sqr_mom=0.99, eps=1e-8),
                         lambda ps: torch.optim.RMSprop(_torch_groups(ps), alpha=0.99, eps=1e-8)),
    'RMSprop-L2':       (lambda ps: fastopt.RMSProp(ps, lr=LRS, wd=1e-2, decouple_wd=False),
                         lambda ps: torch.optim.RMSprop(_torch_groups(ps), alpha=0.99, eps=1e-8, weight_decay=1e-2)),
    'RAdam-L2':         (lambda ps: fastopt.RAdam(ps, lr=LRS, sqr_mom=0.999, eps=1e-8, wd=1e-2, decouple_wd=False),
                         lambda ps: torch.optim.RAdam(_torch_groups(ps), betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)),
    'RAdamW':           (lambda ps: fastopt.RAdam(ps, lr=LRS, eps=1e-8, wd=1e-2),
                         lambda ps: torch.optim.RAdam(_torch_groups(ps), betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2,
                                                      decoupled_weight_decay=True)),
}

@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('impl', ['for-loop', 'foreach'])
def test_matches_torch(case, impl):
    build_ours, build_torch = CASES[case]
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, N_STEPS)
    opt_torch = build_torch(theirs)
    for g in opt_torch.param_groups: g['foreach'] = impl == 'foreach'
    for a, b in zip(run(build_ours(ours), ours, grads), run(opt_torch, theirs, grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

def test_rmsprop_with_momentum_differs_from_torch():
    "The documented difference: momentum is applied before (fastopt) or after (torch) the division"
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, 20)
    a = run(fastopt.RMSProp(ours, lr=1e-2, mom=0.9), ours, grads)
    b = run(torch.optim.RMSprop(sum(theirs, []), lr=1e-2, momentum=0.9), theirs, grads)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-3
