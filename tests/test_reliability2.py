"""Reliability, round 2 (the Optimizer and engine side): torch's names are never dead keys, callbacks declare the
checks of their own hyper-parameters, and more below. Each test failed on the code before its fix."""
import pytest, torch
import fastopt
from fastopt import Optimizer, SGD, Adam
from fastopt.callbacks import weight_decay, average_grad, momentum_step, sgd_step

def _params(n=2): return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]

@pytest.mark.parametrize('make', [
    lambda ps: Optimizer(ps, [average_grad, momentum_step], lr=.1, momentum=0.5),
    lambda ps: Optimizer([{'params': ps, 'momentum': 0.5}], [average_grad, momentum_step], lr=.1),
    lambda ps: Optimizer([{'params': ps, 'betas': (0.5, 0.6)}], [average_grad, momentum_step], lr=.1, sqr_mom=0.9),
])
def test_torch_names_at_construction_set_fastai_names(make):
    opt = make(_params())
    g = opt.param_groups[0]
    assert g['mom'] == 0.5 and 'momentum' not in dict(g) and 'betas' not in dict(g)
    assert 'momentum' not in opt.hypers[0]

def test_torch_names_in_add_param_group_and_param_groups_setter_and_update():
    ps = _params(3)
    opt = Adam(ps[:1], lr=.1)
    opt.add_param_group({'params': ps[1:2], 'betas': (0.5, 0.6)})
    assert (opt.param_groups[1]['mom'], opt.param_groups[1]['sqr_mom']) == (0.5, 0.6)
    assert 'betas' not in dict(opt.param_groups[1])
    opt.param_groups = [{'params': ps[:1], 'momentum': 0.3}, opt.param_groups[1]]
    assert opt.param_groups[0]['mom'] == 0.3 and 'momentum' not in dict(opt.param_groups[0])
    opt.param_groups[0].update(betas=(0.2, 0.7))
    assert (opt.param_groups[0]['mom'], opt.param_groups[0]['sqr_mom']) == (0.2, 0.7)
    assert 'betas' not in dict(opt.param_groups[0])

def test_torch_names_reach_the_callbacks():
    "momentum given by torch's name drives the step: same trajectory as mom"
    a, b = _params(1), [p.detach().clone().requires_grad_() for p in _params(1)]
    b[0].data.copy_(a[0].data)
    oa = Optimizer(a, [average_grad, momentum_step], lr=.1, momentum=0.5)
    ob = Optimizer(b, [average_grad, momentum_step], lr=.1, mom=0.5)
    for i in range(3):
        g = torch.randn(3)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step(); ob.step()
    assert torch.equal(a[0], b[0])

def test_conflicting_torch_and_fastai_names_are_refused():
    with pytest.raises(ValueError, match="'mom' is given twice"):
        Optimizer(_params(), [average_grad, momentum_step], lr=.1, mom=0.9, momentum=0.5)

def test_torch_state_dict_betas_load_as_mom_and_sqr_mom():
    ps = _params(1)
    opt = Adam(ps, lr=.1)
    sd = opt.state_dict()
    g = sd['param_groups'][0]
    g['betas'] = (g.pop('mom') * 0 + 0.5, g.pop('sqr_mom'))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]['mom'] == 0.5 and 'betas' not in dict(opt.param_groups[0])

def _checked_stepper(p, lr, beta, **kwargs): p.data.add_(p.grad, alpha=-lr*beta)
_checked_stepper.defaults = dict(beta=1.)
def _positive(name, v):
    if not v > 0: raise ValueError(f"invalid {name!r}: {v!r} (must be > 0)")
_checked_stepper.hyper_checks = dict(beta=_positive)

def test_callbacks_declare_checks_of_their_hyper_parameters():
    with pytest.raises(ValueError, match="invalid 'beta'"): Optimizer(_params(), [_checked_stepper], lr=.1, beta=-1)
    opt = Optimizer(_params(), [_checked_stepper], lr=.1)
    for write in (lambda: opt.set_hyper('beta', 0.), lambda: opt.param_groups[0].__setitem__('beta', -2.),
                  lambda: opt.hypers[0].__setitem__('beta', 0.),
                  lambda: opt.add_param_group({'params': _params(1), 'beta': -1.})):
        with pytest.raises(ValueError, match="invalid 'beta'"): write()
    assert opt.param_groups[0]['beta'] == 1. and len(opt.param_groups) == 1
    sd = opt.state_dict(); sd['param_groups'][0]['beta'] = -1.
    with pytest.raises(ValueError, match="invalid 'beta'"): opt.load_state_dict(sd)
    import pickle, copy
    for clone in (copy.deepcopy(opt), ):
        with pytest.raises(ValueError, match="invalid 'beta'"): clone.set_hyper('beta', -1.)
