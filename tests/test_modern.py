"""The modern optimizers of `fastopt.modern` against published implementations: 150 steps, three parameter groups
with different learning rates, tensors from 0-d to 3-d, the same initial weights and random gradients, float32,
equal to 1e-5 relative (the largest difference in a tensor over that tensor's largest magnitude). fastopt runs
with `execution='per_param'` and with `execution='fused'` (strict: it raises rather than fall back).

| fastopt                                          | reference                                                     |
|--------------------------------------------------|---------------------------------------------------------------|
| Lion(lr, mom, sqr_mom, wd)                       | lion_pytorch.Lion(lr, betas=(mom, sqr_mom), weight_decay=wd)  |
| Lion(lr, mom, sqr_mom, wd[, decouple_wd])        | pytorch_optimizer.Lion(lr, betas, weight_decay, weight_decouple) |
| Adan(lr, mom, diff_mom, sqr_mom, eps, wd)        | pytorch_optimizer.Adan(lr, betas=(mom, diff_mom, sqr_mom), eps, weight_decay=wd) |
| Adan(..., proximal_wd=False)                     | pytorch_optimizer.Adan(..., weight_decouple=True)             |
| ADOPT(lr, mom, sqr_mom, eps, wd[, decouple_wd])  | pytorch_optimizer.ADOPT(lr, betas, eps, weight_decay, weight_decouple) |
| ADOPT(..., clip_exp=None)                        | pytorch_optimizer.ADOPT(..., clip_lambda=None)                |
| AdEMAMix(lr, mom, sqr_mom, slow_mom, alpha, warmup, eps, wd[, decouple_wd]) | pytorch_optimizer.AdEMAMix(lr, betas=(mom, sqr_mom, slow_mom), alpha, t_alpha_beta3=warmup or None, eps, weight_decay, weight_decouple) |

Each deliberate difference from a reference is a `test_fix_*` or `test_differs_*` test saying why.
"""
import pytest, torch
import fastopt
from fastopt.optimizer import resolve_hyper
from fastopt.modern import *
from helpers import make_groups, gradient_stream, run

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

N_STEPS = 150
SHAPES = [[(5, 4), (4,)], [(3, 3, 2), (7,), ()], [(6, 5), (1,), (2, 1, 3)]]   # three groups; 0-d to 3-d
LR = slice(1e-3, 1e-2)
LRS = resolve_hyper('lr', LR, len(SHAPES))

def _groups(groups, lrs=LRS, **extra):
    "torch-style group dicts for a reference optimizer: one learning rate per group"
    return [{'params': g, 'lr': lr, **extra} for g, lr in zip(groups, lrs)]

def relative_error(xs, ys) -> float:
    "The largest difference in a tensor over that tensor's largest magnitude, over all tensors"
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item() for x, y in zip(xs, ys) if x.numel())

def compare(build_ours, build_ref, execution, n_steps=N_STEPS, tol=1e-5, shapes=SHAPES, before_step=None):
    "Run fastopt and the reference on the same weights and gradients; return fastopt's optimizer and both weights"
    ours, theirs = make_groups(shapes), make_groups(shapes)
    grads = gradient_stream(ours, n_steps)
    opt, ref = build_ours(ours), build_ref(theirs)
    opt.execution = execution
    a, b = run(opt, ours, grads), run(ref, theirs, grads)
    err = relative_error(a, b)
    assert err < tol, f"relative error {err:.2e}"
    if execution == 'fused': assert opt.execution_counts['per_param'] == 0
    return opt, a, b

EXECUTIONS = ['per_param', 'fused']

# ---------------------------------------------------------------------------------------------------------- Lion
import lion_pytorch

LION = {
    'lion_pytorch':            (lambda ps: Lion(ps, lr=LR, wd=0.1),
                                lambda ps: lion_pytorch.Lion(_groups(ps), betas=(0.9, 0.99), weight_decay=0.1)),
    'pytorch_optimizer':       (lambda ps: Lion(ps, lr=LR, mom=0.95, sqr_mom=0.98, wd=0.1),
                                lambda ps: pytorch_optimizer.Lion(_groups(ps), betas=(0.95, 0.98), weight_decay=0.1,
                                                                  foreach=False)),
    'pytorch_optimizer-L2':    (lambda ps: Lion(ps, lr=LR, wd=0.1, decouple_wd=False),
                                lambda ps: pytorch_optimizer.Lion(_groups(ps), weight_decay=0.1, weight_decouple=False,
                                                                  foreach=False)),
}

@pytest.mark.parametrize('execution', EXECUTIONS)
@pytest.mark.parametrize('case', list(LION))
def test_lion_matches_reference(case, execution):
    compare(*LION[case], execution)

def test_lion_defaults_are_the_papers():
    opt = Lion([torch.zeros(2)], lr=1e-4)
    assert (opt.hypers[0]['mom'], opt.hypers[0]['sqr_mom'], opt.hypers[0]['wd']) == (0.9, 0.99, 0.)
    assert opt.param_groups[0]['betas'] == (0.9, 0.99)   # torch's name for the same two numbers

# ---------------------------------------------------------------------------------------------------------- Adan
ADAN = {
    'proximal-wd':  (lambda ps: Adan(ps, lr=LR),
                     lambda ps: pytorch_optimizer.Adan(_groups(ps), betas=(0.98, 0.92, 0.99), weight_decay=0.02,
                                                       foreach=False)),
    'adamw-wd':     (lambda ps: Adan(ps, lr=LR, mom=0.9, diff_mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0.05, proximal_wd=False),
                     lambda ps: pytorch_optimizer.Adan(_groups(ps), betas=(0.9, 0.9, 0.999), eps=1e-6, weight_decay=0.05,
                                                       weight_decouple=True, foreach=True)),
}

@pytest.mark.parametrize('execution', EXECUTIONS)
@pytest.mark.parametrize('case', list(ADAN))
def test_adan_matches_reference(case, execution):
    compare(*ADAN[case], execution)

def test_differs_adan_default_weight_decay_is_the_papers():
    "pytorch-optimizer's Adan defaults to no weight decay; fastopt's to the paper's 0.02 (proximal)"
    opt = Adan([torch.zeros(2)], lr=1e-3)
    assert opt.hypers[0]['wd'] == 0.02
    assert pytorch_optimizer.Adan([torch.zeros(2)]).defaults['weight_decay'] == 0.

# --------------------------------------------------------------------------------------------------------- ADOPT
ADOPT_CASES = {
    'defaults':     (lambda ps: ADOPT(ps, lr=LR),
                     lambda ps: pytorch_optimizer.ADOPT(_groups(ps), betas=(0.9, 0.9999), eps=1e-6, foreach=False)),
    'true-wd':      (lambda ps: ADOPT(ps, lr=LR, sqr_mom=0.99, wd=0.1),
                     lambda ps: pytorch_optimizer.ADOPT(_groups(ps), betas=(0.9, 0.99), weight_decay=0.1,
                                                        weight_decouple=True, foreach=True)),
    'L2':           (lambda ps: ADOPT(ps, lr=LR, mom=0.8, wd=0.1, decouple_wd=False),
                     lambda ps: pytorch_optimizer.ADOPT(_groups(ps), betas=(0.8, 0.9999), weight_decay=0.1,
                                                        foreach=False)),
    'no-clipping':  (lambda ps: ADOPT(ps, lr=LR, clip_exp=None, eps=1e-3),
                     lambda ps: pytorch_optimizer.ADOPT(_groups(ps), clip_lambda=None, eps=1e-3, foreach=False)),
}

@pytest.mark.parametrize('execution', EXECUTIONS)
@pytest.mark.parametrize('case', list(ADOPT_CASES))
def test_adopt_matches_reference(case, execution):
    compare(*ADOPT_CASES[case], execution)

def test_adopt_first_step_moves_nothing():
    p = torch.ones(3); p.grad = torch.tensor([1., -2., 3.])
    opt = ADOPT([p], lr=0.1, wd=0.1)
    opt.step()
    assert torch.allclose(p, torch.full((3,), 1 - 0.1*0.1))   # weight decay only, as in the reference

# ------------------------------------------------------------------------------------------------------ AdEMAMix
ADEMAMIX = {
    'defaults':     (lambda ps: AdEMAMix(ps, lr=LR),
                     lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), betas=(0.9, 0.999, 0.9999), alpha=5., eps=1e-8,
                                                           foreach=False)),
    'warmup-true-wd': (lambda ps: AdEMAMix(ps, lr=LR, slow_mom=0.999, alpha=8., warmup=60, wd=0.1),
                     lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), betas=(0.9, 0.999, 0.999), alpha=8.,
                                                           t_alpha_beta3=60, weight_decay=0.1, weight_decouple=True,
                                                           foreach=True)),
    'L2':           (lambda ps: AdEMAMix(ps, lr=LR, mom=0.8, sqr_mom=0.99, warmup=200, wd=0.05, decouple_wd=False),
                     lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), betas=(0.8, 0.99, 0.9999), t_alpha_beta3=200,
                                                           weight_decay=0.05, foreach=False)),
}

@pytest.mark.parametrize('execution', EXECUTIONS)
@pytest.mark.parametrize('case', list(ADEMAMIX))
def test_ademamix_matches_reference(case, execution):
    compare(*ADEMAMIX[case], execution)

def test_differs_ademamix_default_weight_decay_is_true_weight_decay():
    "pytorch-optimizer's AdEMAMix decays by L2 unless asked; fastopt (like fastai and the paper) by true weight decay"
    assert pytorch_optimizer.AdEMAMix([torch.zeros(2)]).defaults['weight_decouple'] is False
    opt = AdEMAMix([torch.zeros(2)], lr=1e-3, wd=0.1)
    assert opt.cbs[0] is fastopt.weight_decay
