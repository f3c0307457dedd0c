"""Reliability, round 2 (the Optimizer and engine side): torch's names are never dead keys, callbacks declare the
checks of their own hyper-parameters, and more below. Each test failed on the code before its fix."""
import os, pytest, torch
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

# --- item 1: complex parameters are pairs of reals, as torch.optim treats them
@pytest.mark.parametrize('execution', ['auto', 'per_param'])
def test_complex_parameters_match_torch_adam(execution):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, dtype=torch.complex64, generator=g); q = p.clone()
    ours = Adam([p], lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0., execution=execution) \
        if False else Adam([p], lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.)
    ours.execution = execution
    theirs = torch.optim.Adam([q], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):
        grad = torch.randn(4, 3, dtype=torch.complex64, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step(); theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ours.state[p]['grad_avg'].dtype == torch.complex64

# --- item 6: L2 regularisation never writes into the user's gradient, and takes expanded gradients
@pytest.mark.parametrize('execution', ['auto', 'per_param'])
def test_l2_leaves_the_gradient_alone(execution):
    p = torch.nn.Parameter(torch.randn(5))
    opt = Adam([p], lr=1e-2, wd=0.1, decouple_wd=False); opt.execution = execution
    p.grad = torch.ones(5)
    opt.step()
    assert torch.equal(p.grad, torch.ones(5))
    p.grad = torch.ones(1).expand(5)   # an expanded gradient (stride 0)
    opt.step()
    assert torch.equal(p.grad, torch.ones(5))

# --- item 11: named parameters and 0-d numpy values, as torch takes them
def test_named_parameters_and_numpy_scalars_are_accepted():
    import numpy as np
    model = torch.nn.Linear(3, 2)
    opt = Adam(model.named_parameters(), lr=np.array(1e-3))
    assert opt.param_groups[0]['param_names'] == ['weight', 'bias'] and opt.param_groups[0]['lr'] == 1e-3
    assert 'param_names' not in opt.hypers[0]
    model(torch.randn(4, 3)).sum().backward(); opt.step()

# --- item 14: sparse gradients are refused before anything changes; torch.compile(opt.step) runs
def test_sparse_gradient_is_a_type_error_and_changes_nothing():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = Adam([a, b], lr=1e-2)
    a.grad = torch.ones(4); b.grad = torch.ones(4).to_sparse()
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(TypeError, match='parameter 1 of group 0.*sparse'): opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and not opt.state

def test_torch_compile_of_step_runs_and_matches_eager():
    ps, qs = [torch.randn(6)], [torch.randn(6)]
    qs[0].data.copy_(ps[0])
    a, b = Adam(ps, lr=1e-2), Adam(qs, lr=1e-2)
    step = torch.compile(a.step)
    for _ in range(3):
        g = torch.randn(6); ps[0].grad, qs[0].grad = g.clone(), g.clone()
        step(); b.step()
    assert torch.equal(ps[0], qs[0])

def test_repr_names_the_optimizer_and_its_settings():
    r = repr(Adam([torch.randn(2)], lr=1e-3))
    assert r.startswith('Adam (') and "update_rounding='kahan'" in r and 'lr: 0.001' in r

# --- item 9 and 13: load_state_dict checks values and casts floating state like torch
def _trained_adam(dtype=torch.float32):
    p = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    opt = Adam([p], lr=1e-2); p.grad = torch.ones_like(p); opt.step()
    return p, opt

@pytest.mark.parametrize('corrupt,msg', [
    (lambda s: s.__setitem__('step', 1.5), 'integer'),
    (lambda s: s.__setitem__('grad_avg', torch.ones(3, dtype=torch.int64)), 'floating state'),
    (lambda s: s.pop('sqr_avg'), "lacks \\['sqr_avg'\\]"),
])
def test_load_state_dict_checks_values(corrupt, msg):
    p, opt = _trained_adam()
    sd = opt.state_dict(); corrupt(sd['state'][0])
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k,v in opt.state[p].items()}
    with pytest.raises(ValueError, match=msg): opt.load_state_dict(sd)
    assert opt.state[p].keys() == before.keys() and torch.equal(opt.state[p]['grad_avg'], before['grad_avg'])

def test_load_state_dict_hyper_of_the_wrong_type_is_refused():
    p, opt = _trained_adam()
    sd = opt.state_dict(); sd['param_groups'][0]['lr'] = 'fast'
    with pytest.raises((ValueError, TypeError), match="'lr'"): opt.load_state_dict(sd)

def test_float32_state_loads_into_float64_parameters_as_float64():
    p, opt = _trained_adam()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().double()); q.grad = torch.ones_like(q)
    opt2 = Adam([q], lr=1e-2); opt2.load_state_dict(sd)
    assert opt2.state[q]['grad_avg'].dtype == torch.float64
    opt2.step()
    assert opt2.execution_counts['per_param'] == 0

# --- item 8: the kernel cache never breaks a step
def test_a_truncated_cached_library_is_rebuilt(tmp_path, monkeypatch):
    import fastopt.engine.cpu as cpu, fastopt.engine.plan as plan
    monkeypatch.setenv('FASTOPT_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(cpu, '_loaded', {}); monkeypatch.setattr(cpu, '_failed', {}); monkeypatch.setattr(plan, '_kernels', {})
    def one_step():
        p = torch.randn(3); p.grad = torch.ones(3)
        opt = Adam([p], lr=0.1, wd=0.123); opt.execution = 'fused'; opt.step()
    one_step()
    libs = list((tmp_path/'kernels').glob('*.so'))
    for lib in libs:   # an empty (truncated) library, as a crashed writer would leave (a new file: the loaded one stays mapped)
        tmp = lib.with_suffix('.tmp'); tmp.write_bytes(b''); os.replace(tmp, lib)
    monkeypatch.setattr(cpu, '_loaded', {}); monkeypatch.setattr(plan, '_kernels', {})
    one_step()
    assert all(lib.stat().st_size > 0 for lib in libs)

def test_no_home_and_no_cache_variable_still_fuses(monkeypatch):
    import fastopt.engine.cpu as cpu, pathlib
    monkeypatch.delenv('FASTOPT_CACHE_DIR', raising=False)
    def no_home(): raise RuntimeError('Could not determine home directory.')
    monkeypatch.setattr(pathlib.Path, 'home', staticmethod(no_home))
    assert 'fastopt-kernels-' in str(cpu.cache_dir())

def test_the_machine_tag_names_cpu_features_on_every_architecture(monkeypatch):
    import fastopt.engine.cpu as cpu, io, builtins
    text = 'processor\t: 0\nFeatures\t: fp asimd sve\n'
    real_open = builtins.open
    monkeypatch.setattr(builtins, 'open', lambda f, *a, **k: io.StringIO(text) if f == '/proc/cpuinfo' else real_open(f, *a, **k))
    cpu.machine_tag.cache_clear()
    try: assert 'sve' in cpu.machine_tag()
    finally: cpu.machine_tag.cache_clear()

def test_checkpoint_of_an_sgd_built_with_mom_0_before_average_grad_was_always_there_loads():
    p = torch.nn.Parameter(torch.randn(3))
    opt = SGD([p], lr=0.1)
    p.grad = torch.ones(3); opt.step()
    sd = opt.state_dict()
    sd['callbacks'] = [n for n in sd['callbacks'] if n != 'average_grad']   # as the old SGD(mom=0) saved it
    opt.load_state_dict(sd)
    sd['state'][0]['grad_avg'] = torch.zeros(3)   # but not if an average was kept: that is another optimizer
    with pytest.raises(ValueError, match='saved by an optimizer with callbacks'): opt.load_state_dict(sd)

def _row_stat(p, row_avg=None, **kwargs):
    "A stat kept per row of a matrix (state that is not shaped like its parameter)"
    g = p.grad.data
    return {'row_avg': g.mean(-1) if row_avg is None else row_avg.mul_(0.5).add_(g.mean(-1), alpha=0.5)}
_row_stat.state_shapes = dict(row_avg=lambda p: p.shape[:-1])

def test_state_of_a_declared_shape_loads_and_other_shapes_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Optimizer([p], [_row_stat, sgd_step], lr=0.1)
    p.grad = torch.ones(4, 3); opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.state[p]['row_avg'].shape == (4,)
    sd['state'][0]['row_avg'] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"has shape \(3,\) but the callbacks declare shape \(4,\)"): opt.load_state_dict(sd)

def test_step_parameters_steps_a_subset_exactly_as_step_does():
    a, b = [torch.randn(5) for _ in range(3)], None
    b = [p.clone() for p in a]
    oa, ob = Adam(a, lr=1e-2), Adam(b, lr=1e-2)
    for i in range(4):
        g = [torch.randn(5) for _ in range(3)]
        for p, q, x in zip(a, b, g): p.grad, q.grad = x.clone(), x.clone()
        for p in a: oa.step_parameters([p])   # one at a time, as gradient release does
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match='not parameters of this optimizer'): oa.step_parameters([torch.randn(2)])

def test_step_parameters_follows_changes_to_the_groups():
    # step_parameters finds a parameter in O(1) from a table; the table must follow every change to the groups
    ps = [torch.randn(4) for _ in range(4)]
    opt = SGD(ps[:2], lr=0.5)
    for p in ps: p.grad = torch.ones(4)
    before = [p.clone() for p in ps]
    opt.step_parameters([ps[1]])   # the table is made here
    opt.add_param_group({'params': ps[2:], 'lr': 0.25})
    opt.step_parameters([ps[3], ps[2]])
    assert torch.equal(ps[1], before[1] - 0.5) and torch.equal(ps[2], before[2] - 0.25) and torch.equal(ps[3], before[3] - 0.25)
    assert torch.equal(ps[0], before[0])
    removed = opt.param_groups[0]['params'].pop(1)   # a parameter taken out of its group is no longer the optimizer's
    with pytest.raises(ValueError, match='not parameters of this optimizer'): opt.step_parameters([removed])
    opt.param_groups[1]['params'].reverse()   # moved inside its group: found at its new place
    opt.step_parameters([ps[2]])
    assert torch.equal(ps[2], before[2] - 0.5)
