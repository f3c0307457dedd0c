"""fastopt against fastai 2.8: the same optimizers, from the same weights, fed the same random gradients for
100 steps over two parameter groups, must agree to 1e-6 (relative). Where fastopt deliberately differs (a fixed
fastai bug), a test below says so and checks both behaviours."""
import io, pytest, torch
from functools import partial
import fastai.optimizer as fai
import fastopt
from helpers import SHAPES, make_groups, clone_groups, gradient_stream, run

N_STEPS = 100
LR = slice(1e-3, 1e-2)   # discriminative: a different lr per group

CASES = {
    'SGD':          dict(),
    'SGD-mom':      dict(mom=0.9),
    'RMSProp':      dict(),
    'RMSProp-mom':  dict(mom=0.9),
    'Adam':         dict(),
    'RAdam':        dict(),
    'RAdam-SAdam':  dict(beta=50.),
    'QHAdam':       dict(),
    'QHAdam-nu':    dict(nu_1=0.5, nu_2=0.9),
    'Larc':         dict(),
    'Lars':         dict(clip=False),
    'Lamb':         dict(),
}

def _factory(case): return case.split('-')[0].replace('Lars', 'Larc')

@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('wd,decouple_wd', [(0., True), (1e-2, True), (1e-2, False)])
def test_matches_fastai(case, wd, decouple_wd):
    name, kwargs = _factory(case), dict(CASES[case], wd=wd, decouple_wd=decouple_wd)
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, N_STEPS)
    opt_ours = getattr(fastopt, name)(ours, lr=LR, **kwargs)
    opt_theirs = getattr(fai, name)(theirs, lr=LR, **kwargs)
    assert [h['lr'] for h in opt_ours.hypers] == pytest.approx([h['lr'] for h in opt_theirs.hypers])
    for a, b in zip(run(opt_ours, ours, grads), run(opt_theirs, theirs, grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the stats agree too, not just the weights
    for a, b in zip(opt_ours.all_params(), opt_theirs.all_params()):
        for k, v in b[2].items():
            if isinstance(v, torch.Tensor): torch.testing.assert_close(a[2][k], v, rtol=1e-6, atol=1e-7)
            else: assert a[2][k] == pytest.approx(v)

def test_the_seven_optimizers_are_exported():
    "from fastopt import * gives the seven compositions"
    for name in ['SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb']: assert callable(getattr(fastopt, name))

def test_same_defaults_as_fastai():
    import inspect
    for name in ['SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb']:
        ours, theirs = inspect.signature(getattr(fastopt, name)), inspect.signature(getattr(fai, name))
        # fastai's arguments, in fastai's order with fastai's defaults; then fastopt's `**settings` (never hypers)
        mine = [p for p in ours.parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert [p.name for p in mine] == list(theirs.parameters), name
        assert [p.default for p in mine] == [p.default for p in theirs.parameters.values()], name
        assert [p.name for p in ours.parameters.values() if p.kind is p.VAR_KEYWORD] == ['settings'], name

def test_same_hypers_as_fastai():
    for name in ['SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb']:
        ours = getattr(fastopt, name)(make_groups(SHAPES), lr=1e-3)
        theirs = getattr(fai, name)(make_groups(SHAPES), lr=1e-3)
        assert [dict(h) for h in ours.hypers] == [dict(h) for h in theirs.hypers], name

def test_user_composition_matches_fastai():
    "A hand-composed optimizer with a user-written stat mixed with built-ins"
    def grad_clip_stat(p, clip_to=1., **kwargs): p.grad.clamp_(-clip_to, clip_to)
    cbs_ours = [fastopt.weight_decay, grad_clip_stat, partial(fastopt.average_grad, dampening=True),
                fastopt.average_sqr_grad, fastopt.step_stat, fastopt.adam_step]
    cbs_theirs = [fai.weight_decay, grad_clip_stat, partial(fai.average_grad, dampening=True),
                  fai.average_sqr_grad, fai.step_stat, fai.adam_step]
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, 50)
    hp = dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=1e-2)
    for a, b in zip(run(fastopt.Optimizer(ours, cbs_ours, **hp), ours, grads),
                    run(fai.Optimizer(theirs, cbs_theirs, **hp), theirs, grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

# ---- deliberate differences: fastai bugs that fastopt fixes ----

def test_fix_param_groups_setter_sets_params():
    "fastai's `param_groups` setter assigns to a loop variable, so new params are silently dropped"
    a, b = torch.zeros(2), torch.ones(2)
    theirs = fai.SGD([a], lr=0.1)
    theirs.param_groups = [{'params': [b], 'lr': 0.5}]
    assert theirs.param_lists[0][0] is a and theirs.hypers[0]['lr'] == 0.5   # fastai: params unchanged
    ours = fastopt.SGD([a], lr=0.1)
    ours.param_groups = [{'params': [b], 'lr': 0.5}]
    assert ours.param_lists[0][0] is b and ours.hypers[0]['lr'] == 0.5

@pytest.mark.parametrize('stepper', ['adam_step', 'radam_step', 'qhadam_step', 'lamb_step'])
def test_fix_stepper_eps_default_is_merged(stepper):
    "fastai stores these steppers' defaults as `_defaults`, which its Optimizer never reads"
    def cbs(mod): return [partial(mod.average_grad, dampening=True), mod.average_sqr_grad, mod.step_stat,
                          getattr(mod, stepper)]
    extra = dict(mom=0.9, sqr_mom=0.99, nu_1=0.7, nu_2=1.0, beta=0.)
    p = torch.ones(3); p.grad = torch.ones(3)
    theirs = fai.Optimizer([p], cbs(fai), lr=0.1, **extra)
    assert 'eps' not in theirs.hypers[0]
    with pytest.raises(TypeError, match='eps'): theirs.step()
    q = torch.ones(3); q.grad = torch.ones(3)
    ours = fastopt.Optimizer([q], cbs(fastopt), lr=0.1, **extra)
    assert ours.hypers[0]['eps'] == getattr(fastopt, stepper).defaults['eps']
    ours.step()
    assert (q < 1).all()

def test_fix_state_dict_loads_with_weights_only():
    "fastai's state dict holds fastcore `L` objects, which torch's safe loader refuses"
    def saved(opt):
        p = opt.param_lists[0][0]; p.grad = torch.ones_like(p); opt.step()
        buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0); return buf
    with pytest.raises(Exception): torch.load(saved(fai.Adam([torch.ones(3)], lr=0.1)), weights_only=True)
    sd = torch.load(saved(fastopt.Adam([torch.ones(3)], lr=0.1)), weights_only=True)
    assert sd['state'][0]['step'] == 1

def test_fix_load_state_dict_raises_value_error():
    "fastai checks a state dict with bare asserts (gone under python -O); fastopt raises ValueError"
    sd = fastopt.Adam([torch.ones(3)], lr=0.1).state_dict()
    with pytest.raises(AssertionError): fai.Adam([torch.ones(3), torch.ones(2)], lr=0.1).load_state_dict(
        fai.Adam([torch.ones(3)], lr=0.1).state_dict())
    with pytest.raises(ValueError, match='1 parameters'):
        fastopt.Adam([torch.ones(3), torch.ones(2)], lr=0.1).load_state_dict(sd)

def test_fix_larc_moves_zero_parameters():
    "fastai's LARC gives a parameter of norm 0 a local lr of 0, so it never moves; fastopt uses lr (as apex)"
    for mod, moves in [(fai, False), (fastopt, True)]:
        bias = torch.zeros(4); opt = mod.Larc([bias], lr=0.1)
        for _ in range(3):
            bias.grad = torch.ones(4); opt.step()
        assert bool((bias != 0).all()) == moves, mod.__name__

def test_fix_zero_grad_sets_to_none_by_default():
    "fastai zeroes gradients in place; fastopt follows torch and sets them to None unless asked otherwise"
    p = torch.ones(2); p.grad = torch.ones(2)
    fai.SGD([p], lr=0.1).zero_grad(); assert p.grad is not None
    fastopt.SGD([p], lr=0.1).zero_grad(); assert p.grad is None
    p.grad = torch.ones(2); fastopt.SGD([p], lr=0.1).zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(2))

def test_closure_supported():
    "fastai raises NotImplementedError for a closure; torch.optim's contract is to call it under grad"
    w = torch.ones(2, requires_grad=True)
    opt = fastopt.SGD([w], lr=0.1)
    def closure():
        opt.zero_grad(); loss = (w*w).sum(); loss.backward(); return loss
    assert opt.step(closure).item() == 2.
    torch.testing.assert_close(w.detach(), torch.full((2,), 0.8))
    with pytest.raises(NotImplementedError): fai.SGD([w], lr=0.1).step(closure)

def _trained_then_frozen(make_opt):
    "One step of both groups (every gradient ones), then the first group frozen; its gradients are left in place"
    groups = make_groups(SHAPES)
    for p in (p for g in groups for p in g): p.requires_grad_(True)
    opt = make_opt(groups)
    for p in (p for g in groups for p in g): p.grad = torch.ones_like(p)
    opt.step()
    opt.freeze()
    return groups, opt, [p.detach().clone() for p in groups[0]]

def _stale_gradients_then_freeze(make_opt, steps=3):
    "Is each frozen parameter unchanged after `steps` steps with its stale gradient?"
    groups, opt, frozen = _trained_then_frozen(make_opt)
    for _ in range(steps): opt.step()
    return [torch.equal(p, f) for p, f in zip(groups[0], frozen)]

@pytest.mark.parametrize('name', ['Adam', 'SGD-mom'])
def test_fix_frozen_parameters_are_never_stepped(name):
    "fastai steps a frozen parameter that still holds a gradient (momentum keeps moving it); fastopt leaves it alone"
    kw = dict(lr=1e-2, mom=0.9) if name == 'SGD-mom' else dict(lr=1e-2)
    base = name.split('-')[0]
    assert not any(_stale_gradients_then_freeze(lambda g: getattr(fai, base)(g, **kw)))
    assert all(_stale_gradients_then_freeze(lambda g: getattr(fastopt, base)(g, **kw)))

def _frozen_between_synchronisations(make_opt):
    "Freeze the first group (its gradients dropped) between synchronisations and step: does the sync move it?"
    groups, opt, frozen = _trained_then_frozen(make_opt)
    for p in groups[0]: p.grad = None
    opt.step()                                     # the synchronisation (k=2)
    return opt, frozen, [torch.equal(p, f) for p, f in zip(groups[0], frozen)]

def test_fix_lookahead_sync_leaves_frozen_parameters_alone():
    "fastai's Lookahead pulls a parameter frozen between synchronisations back towards its slow weight"
    _, _, unchanged = _frozen_between_synchronisations(lambda g: fai.Lookahead(fai.SGD(g, lr=0.1), k=2))
    assert not any(unchanged)
    opt, frozen, unchanged = _frozen_between_synchronisations(lambda g: fastopt.Lookahead(fastopt.SGD(g, lr=0.1), k=2))
    assert all(unchanged)
    # the slow weights joined the frozen ones, so unfreezing resumes training from where the group was frozen
    assert all(torch.equal(s, f) for s, f in zip(opt.slow_weights[0], frozen))

def test_fix_rmsprop_eps_reaches_the_callbacks():
    "fastai's RMSProp takes `eps` but never passes it on: its stepper uses the default 1e-8 whatever it is given"
    for mod, used in [(fai, 1e-8), (fastopt, 0.1)]:
        p = torch.ones(3); opt = mod.RMSProp([p], lr=0.1, eps=0.1)
        assert opt.hypers[0]['eps'] == used, mod.__name__
        p.grad = torch.full((3,), 0.1); opt.step()   # sqrt(v) = sqrt(0.01 g²) = 0.01: the step is lr*g/(0.01 + eps)
        torch.testing.assert_close(p, torch.full((3,), 1 - 0.1*0.1/(0.01 + used)))

@pytest.mark.parametrize('name', ['SGD', 'RMSProp', 'Larc'])
def test_fix_momentum_set_after_construction_takes_effect(name):
    "fastai chooses the callbacks from `mom` at construction: built with mom=0, it ignores a momentum set later"
    def steps(mod):
        groups = make_groups(SHAPES)
        opt = getattr(mod, name)(groups, lr=1e-2, mom=0.)
        grads = gradient_stream(groups, 3)
        run(opt, groups, grads[:1]); opt.set_hyper('mom', 0.9); return run(opt, groups, grads[1:])
    def reference(mom):   # fastai's, with momentum `mom` from the second step on (its sqr_avg carried over)
        groups = make_groups(SHAPES)
        opt, grads = getattr(fai, name)(groups, lr=1e-2, mom=0.), gradient_stream(groups, 3)
        run(opt, groups, grads[:1])
        opt2 = getattr(fai, name)(groups, lr=1e-2, mom=mom)
        for p in opt.state: opt2.state[p] = {k: v for k, v in opt.state[p].items() if k == 'sqr_avg'}
        return run(opt2, groups, grads[1:])
    for a, b in zip(steps(fai), reference(0.)): torch.testing.assert_close(a, b)       # fastai: still no momentum
    for a, b in zip(steps(fastopt), reference(0.9)): torch.testing.assert_close(a, b)  # fastopt: momentum from step 2
