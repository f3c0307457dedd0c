"""Reliability, round 2 (the callbacks and ready-made optimizers): every hyper-parameter is checked, momentum set
after construction takes effect, no argument of a ready-made optimizer is dead, and each optimizer has its name.
Each test failed on the code before its fix, except the guards marked as such."""
import copy, inspect, re
import pytest, torch
import fastai.optimizer as fai
import fastopt
from fastopt import callbacks
from fastopt.optimizer import callback_checks

FACTORIES = {name: getattr(fastopt, name) for name in ['SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb']}

def _params(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, generator=gen) for _ in range(n)]

def _grads(params, n_steps, seed=1, scales=None):
    "One gradient per parameter per step; `scales` multiplies each parameter's gradients"
    gen, scales = torch.Generator().manual_seed(seed), scales or [1.]*len(params)
    return [[torch.randn(p.shape, generator=gen)*s for p, s in zip(params, scales)] for _ in range(n_steps)]

def _step(opt, params, grads):
    for p, g in zip(params, grads): p.grad = g.clone()
    opt.step()

# ---- A: every hyper-parameter is validated ----

NAN, INF = float('nan'), float('inf')
BAD = {   # argument of a ready-made optimizer -> values none may take
    'lr': [-1e-3, NAN, 'a'], 'mom': [-0.1, 1., INF], 'sqr_mom': [1., -0.5], 'eps': [-1e-8, NAN], 'wd': [-0.1, INF],
    'beta': [-3., INF, NAN, 'x'], 'nu_1': [5., -0.1, NAN], 'nu_2': [1.5, -1.], 'trust_coeff': [-1., 0., INF],
    'clip': ['yes', 1, None], 'decouple_wd': ['no', 0, None],
}

def _args(factory): return [a for a in inspect.signature(factory).parameters if a not in ('params', 'settings')]

BAD_CASES = [(name, arg, bad) for name, f in FACTORIES.items() for arg in _args(f) for bad in BAD[arg]]

def test_every_argument_has_bad_values():
    for name, f in FACTORIES.items():
        assert not set(_args(f)) - set(BAD), f"{name}: add bad values for {set(_args(f)) - set(BAD)}"

def _names(arg): return re.escape(f"'{arg}'")

@pytest.mark.parametrize('name,arg,bad', BAD_CASES)
def test_bad_value_refused_at_construction(name, arg, bad):
    kwargs = {'lr': 1e-2, arg: bad}
    with pytest.raises((ValueError, TypeError), match=_names(arg)): FACTORIES[name](_params(), **kwargs)

def _snapshot(opt, params):
    return ([p.clone() for p in params], copy.deepcopy(dict(opt.state)), [dict(h) for h in opt.hypers])

@pytest.mark.parametrize('name,arg,bad', BAD_CASES)
def test_bad_value_refused_later_and_nothing_changes(name, arg, bad):
    params = _params()
    opt = FACTORIES[name](params, lr=1e-2)
    for gs in _grads(params, 2): _step(opt, params, gs)
    before = _snapshot(opt, params)
    with pytest.raises((ValueError, TypeError), match=_names(arg)): opt.set_hyper(arg, bad)
    if arg in opt.hypers[0]:   # a hyper-parameter (clip and decouple_wd choose callbacks: set_hyper refuses them)
        with pytest.raises((ValueError, TypeError), match=_names(arg)): opt.param_groups[0][arg] = bad
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[2] == after[2]
    for p in params:
        for k, v in before[1].get(p, {}).items():
            assert torch.equal(v, after[1][p][k]) if isinstance(v, torch.Tensor) else v == after[1][p][k]

STATE = {'grad_avg', 'sqr_avg', 'step', 'local_lr', 'do_wd'}   # what callbacks read from the state, not the group

def _callbacks():
    for name in callbacks.__all__:
        f = getattr(callbacks, name)
        if callable(f) and list(inspect.signature(f).parameters)[:1] == ['p']: yield name, f

@pytest.mark.parametrize('name,cb', list(_callbacks()))
def test_every_hyper_parameter_a_callback_reads_has_a_check(name, cb):
    hypers = [a for a, prm in inspect.signature(cb).parameters.items()
              if a != 'p' and prm.kind is not prm.VAR_KEYWORD and a not in STATE]
    checks = callback_checks([cb])
    assert not [h for h in hypers if h not in checks], f"{name} reads unchecked hyper-parameters"

# ---- B: momentum set after construction takes effect ----

def _torch_sgd_with_switch(params, grads, switch_at, **kw):
    "torch.optim.SGD built with momentum 0, switched to 0.9 before step `switch_at`"
    opt, traj = torch.optim.SGD(params, momentum=0., **kw), []
    for i, gs in enumerate(grads):
        if i == switch_at: opt.param_groups[0]['momentum'] = 0.9
        _step(opt, params, gs)
        traj.append(([p.clone() for p in params], [copy.deepcopy(dict(opt.state[p])) for p in params]))
    return traj

@pytest.mark.parametrize('execution', ['per_param', 'fused'])
@pytest.mark.parametrize('wd', [0., 1e-2])
def test_sgd_momentum_set_after_construction_matches_torch(execution, wd):
    """torch starts the momentum buffer, as the gradient, at the first step with momentum != 0, and keeps none before;
    so does fastopt (`set_hyper('mom', 0.9)` on an SGD built with mom=0). fastai's SGD ignores the new momentum."""
    ours, theirs = _params(), _params()
    grads = _grads(ours, 8)
    expected = _torch_sgd_with_switch(theirs, grads, 3, lr=0.1, weight_decay=wd)
    opt = fastopt.SGD(ours, lr=0.1, wd=wd, decouple_wd=False)   # torch's weight_decay is L2
    opt.execution = execution
    for i, (gs, (ps, states)) in enumerate(zip(grads, expected)):
        if i == 3: opt.set_hyper('mom', 0.9)
        _step(opt, ours, gs)
        for p, q, s in zip(ours, ps, states):
            torch.testing.assert_close(p, q)
            assert ('grad_avg' in opt.state[p]) == ('momentum_buffer' in s) == (i >= 3)
            if i >= 3: torch.testing.assert_close(opt.state[p]['grad_avg'], s['momentum_buffer'])

def test_sgd_momentum_cycled_by_torch_cyclic_lr_matches_torch():
    "torch's CyclicLR cycles the momentum of an SGD built with momentum 0; fastopt follows it"
    ours, theirs = _params(), _params()
    grads = _grads(ours, 10)
    sched = dict(base_lr=0.01, max_lr=0.1, step_size_up=3, base_momentum=0.8, max_momentum=0.9)
    opt_o, opt_t = fastopt.SGD(ours, lr=0.1), torch.optim.SGD(theirs, lr=0.1)
    s_o, s_t = (torch.optim.lr_scheduler.CyclicLR(o, **sched) for o in (opt_o, opt_t))
    for gs in grads:
        _step(opt_o, ours, gs); _step(opt_t, theirs, gs)
        s_o.step(); s_t.step()
        for p, q in zip(ours, theirs): torch.testing.assert_close(p, q)
    assert opt_o.param_groups[0]['mom'] == opt_t.param_groups[0]['momentum'] != 0

def _fastai_switched(name, params, grads, switch_at, keep, **kw):
    """The natural reference in fastai: its `name` built with mom=0, replaced before step `switch_at` by one built
    with mom=0.9 whose state starts from the first's `keep` entries (its momentum buffer starts at that step)"""
    opt, traj = getattr(fai, name)(params, mom=0., **kw), []
    for i, gs in enumerate(grads):
        if i == switch_at:
            new = getattr(fai, name)(params, mom=0.9, **kw)
            for p in params: new.state[p] = {k: v for k, v in opt.state[p].items() if k in keep}
            opt = new
        _step(opt, params, gs)
        traj.append([p.clone() for p in params])
    return traj

@pytest.mark.parametrize('name,keep', [('RMSProp', {'sqr_avg'}), ('Larc', set())])
def test_rmsprop_and_larc_momentum_set_after_construction(name, keep):
    ours, theirs = _params(), _params()
    grads = _grads(ours, 8)
    expected = _fastai_switched(name, theirs, grads, 3, keep, lr=0.01)
    opt = getattr(fastopt, name)(ours, lr=0.01, mom=0.)
    for i, (gs, ps) in enumerate(zip(grads, expected)):
        if i == 3: opt.set_hyper('mom', 0.9)
        _step(opt, ours, gs)
        for p, q in zip(ours, ps): torch.testing.assert_close(p, q)
        assert all(('grad_avg' in opt.state[p]) == (i >= 3) for p in ours)

@pytest.mark.parametrize('execution', ['per_param', 'fused'])
@pytest.mark.parametrize('name', ['SGD', 'RMSProp', 'Larc'])
def test_no_momentum_buffer_while_mom_is_zero(name, execution):
    "A guard (it passed before the fix too): with mom=0 throughout nothing is allocated, as torch's SGD"
    params = _params()
    opt = FACTORIES[name](params, lr=0.01, mom=0.)
    opt.execution = execution
    for gs in _grads(params, 3): _step(opt, params, gs)
    assert not any('grad_avg' in opt.state[p] for p in params)
    theirs = _params()
    torch_opt = torch.optim.SGD(theirs, lr=0.01)
    for gs in _grads(theirs, 3): _step(torch_opt, theirs, gs)
    assert not any('momentum_buffer' in torch_opt.state[p] for p in theirs)

def test_momentum_back_to_zero_continues_the_average_as_fastai():
    """A guard documenting a difference from torch (it passed before the fix too): once the buffer exists, mom=0 keeps the recurrence m = mom*m + g (m becomes
    g, as in fastai), where torch leaves the buffer untouched while momentum is 0. The steps taken while mom is 0 are
    the same (both step along g); when the momentum comes back, torch resumes its stale buffer, fastopt (and fastai)
    the last gradient."""
    ours, fa, th = _params(), _params(), _params()
    grads = _grads(ours, 6)
    opt_o, opt_f = fastopt.SGD(ours, lr=0.1, mom=0.9), fai.SGD(fa, lr=0.1, mom=0.9)
    opt_t = torch.optim.SGD(th, lr=0.1, momentum=0.9)
    moms = [0.9, 0.9, 0., 0., 0.9, 0.9]
    for i, (m, gs) in enumerate(zip(moms, grads)):
        opt_o.set_hyper('mom', m); opt_f.set_hyper('mom', m); opt_t.param_groups[0]['momentum'] = m
        for opt, ps in ((opt_o, ours), (opt_f, fa), (opt_t, th)): _step(opt, ps, gs)
        for p, q in zip(ours, fa): torch.testing.assert_close(p, q)
        same_as_torch = all(torch.allclose(p, q) for p, q in zip(ours, th))
        assert same_as_torch == (i < 4), i

# ---- C: no argument of a ready-made optimizer is dead ----

ALT = dict(lr=3e-2, mom=0.5, sqr_mom=0.9, eps=0.1, wd=0.3, decouple_wd=False, beta=50., nu_1=0.3, nu_2=0.5,
           clip=False, trust_coeff=0.05, k=2, alpha=0.8, reset_state=True)   # a valid value to change each to

def _lookahead(params, **kw): return fastopt.Lookahead(fastopt.Adam(params, lr=1e-2), **kw)

# Base settings chosen so that every argument matters: weight decay on (else decouple_wd cannot matter), momentum on
# for SGD (plain SGD's true weight decay and L2 are the same map), little weight decay for Larc (else no local rate
# reaches lr, and clip cannot matter). The first parameter's gradients are tiny (1e-3) so that eps matters.
ALL = {**{name: (f, dict(lr=1e-2, wd=0.1)) for name, f in FACTORIES.items()},
       'SGD': (fastopt.SGD, dict(lr=1e-2, mom=0.9, wd=0.1)), 'Larc': (fastopt.Larc, dict(lr=1e-2, wd=1e-3)),
       'ranger': (fastopt.ranger, dict(lr=1e-2)), 'Lookahead': (_lookahead, {})}
SIGNATURES = {'Lookahead': [a for a in inspect.signature(fastopt.Lookahead).parameters if a not in ('opt', 'settings')]}

def _all_args(name):
    return SIGNATURES.get(name) or [a for a in inspect.signature(ALL[name][0]).parameters if a not in ('params', 'kwargs', 'settings')]

ARG_CASES = [(name, arg) for name in ALL for arg in _all_args(name)]

def _trajectory(make, **kw):
    params = _params()
    opt = make(params, **kw)
    for gs in _grads(params, 10, scales=[1e-3, 1.]): _step(opt, params, gs)
    return params

def test_every_argument_has_another_value():
    assert not {a for _, a in ARG_CASES} - set(ALT)

@pytest.mark.parametrize('name,arg', ARG_CASES)
def test_every_argument_changes_the_trajectory(name, arg):
    make, base = ALL[name]
    default = inspect.signature(fastopt.Lookahead if name == 'Lookahead' else make).parameters[arg].default
    assert base.get(arg, default) != ALT[arg]
    a, b = _trajectory(make, **base), _trajectory(make, **{**base, arg: ALT[arg]})
    assert not all(torch.allclose(p, q) for p, q in zip(a, b)), f"{name}({arg}={ALT[arg]!r}) takes the same steps"

# ---- D: each ready-made optimizer prints its own name ----

@pytest.mark.parametrize('name', list(FACTORIES))
def test_ready_made_optimizers_are_named(name):
    opt = FACTORIES[name](_params(), lr=1e-3)
    assert opt.name == name
    assert repr(opt).startswith(name), repr(opt)   # needs Optimizer.__repr__ to print `name` (nbs/01)
