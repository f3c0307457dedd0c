"""The foreach backend (`execution='foreach'`, and what 'auto' runs on devices without an emitter): the traced
program as torch operations over a bucket's tensor lists agrees with the per-parameter reference for every
optimizer, in float32 (1e-6 relative) and for bfloat16 parameters with each `update_rounding` (within one ulp,
99% exact after each step); no parameter falls back; the planner's backend choice routes non-CPU devices to it."""
import pytest, torch
import torch.nn.functional as F
import fastopt.engine.plan as plan
from fastopt import Optimizer, SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb, ranger
from fastopt.modern import Lion, Adan, StableAdamW
from fastopt.callbacks import weight_decay, average_grad, momentum_step
from fastopt.engine.storage import roundings
from helpers import make_groups, run
from test_engine_dtypes import Agreement, compare_runs, grad_stream, _resync, _flat, _inner, SHAPES3

OPTIMIZERS = {
    'SGD-mom':     lambda ps: SGD(ps, lr=slice(1e-2, 5e-2), mom=0.9, wd=1e-2),
    'RMSProp':     lambda ps: RMSProp(ps, lr=1e-2, mom=0.9, wd=1e-2),
    'Adam':        lambda ps: Adam(ps, lr=slice(1e-3, 1e-2)),
    'Adam-l2':     lambda ps: Adam(ps, lr=1e-3, wd=1e-2, decouple_wd=False),
    'RAdam':       lambda ps: RAdam(ps, lr=1e-2, wd=1e-2),
    'QHAdam':      lambda ps: QHAdam(ps, lr=1e-2, wd=1e-2),
    'Larc':        lambda ps: Larc(ps, lr=5e-2, wd=1e-3),
    'Lamb':        lambda ps: Lamb(ps, lr=1e-2, wd=1e-2),
    'ranger':      lambda ps: ranger(ps, lr=1e-2, k=3),
    'composed':    lambda ps: Optimizer(ps, [weight_decay, average_grad, momentum_step], lr=5e-2, wd=1e-2),
    'Lion':        lambda ps: Lion(ps, lr=1e-3, wd=1e-2),
    'Adan':        lambda ps: Adan(ps, lr=1e-3),
    'StableAdamW': lambda ps: StableAdamW(ps, lr=1e-3, wd=1e-2),
}

def _exotic(p, lr, **kwargs):
    "A stepper using the nodes foreach lacks (where, comparisons, clamp, softplus, sign, pow, s - x, s / x, max) and per-tensor numbers"
    g = p.grad
    u = torch.where(g > 0, F.softplus(g, beta=2.), (1.0 - g).clamp(min=-0.5, max=0.5))
    u = u + 0.5 / (g.abs() + 1) - torch.maximum(g, torch.zeros_like(g)) * g.sign() + (2.0 ** g.clamp(-1, 1)) * (g != 0)
    u = u * (p.norm() / (u.norm() + 1e-3)).clamp(max=2.)   # a per-tensor number
    u = u.lerp(g, (g.abs().mean() / (1 + g.abs().mean())))   # a per-tensor weight
    p.data.add_(u, alpha=-lr)
_exotic.defaults = dict(lr=1e-3)
OPTIMIZERS['exotic'] = lambda ps: Optimizer(ps, [weight_decay, _exotic], lr=1e-3, wd=1e-2)

def _relative_error(xs, ys) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item() for x, y in zip(xs, ys) if x.numel())

def _backends(opt) -> set:
    return {b.backend for gp in _inner(opt)._planner.plans.values() for b in gp.buckets}

def _foreach_and_reference(make, n_steps, dtype=torch.float32, shapes=SHAPES3, execution='foreach'):
    groups, ref_groups = make_groups(shapes, dtype=dtype), make_groups(shapes, dtype=dtype)
    opt, ref = make(groups), make(ref_groups)
    opt.execution, ref.execution = execution, 'per_param'
    grads = grad_stream(groups, n_steps)
    run(opt, groups, grads); run(ref, ref_groups, grads)
    return opt, ref, groups, ref_groups

@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_foreach_matches_per_parameter(name):
    opt, ref, groups, ref_groups = _foreach_and_reference(OPTIMIZERS[name], 50)
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6
    for p, q in zip(_flat(groups), _flat(ref_groups)):   # and the state, entry by entry
        a, b = _inner(opt).state[p], _inner(ref).state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                if a[k].numel(): assert ((a[k] - b[k]).abs().max() <= 1e-6 * b[k].abs().max().clamp(min=1)).item(), k
            else: assert a[k] == b[k], k
    assert _inner(opt).execution_counts == {'fused': 50 * len(_flat(groups)), 'per_param': 0}
    assert _backends(opt) == {'foreach'}

def test_foreach_float64_and_complex():
    for dtype, tol in ((torch.float64, 1e-13), (torch.complex64, 1e-6)):
        opt, ref, groups, ref_groups = _foreach_and_reference(OPTIMIZERS['Adam'], 20, dtype, [[(5, 4), (3,), ()], [(0,), (7,)]])
        assert _relative_error(_flat(groups), _flat(ref_groups)) < tol
        assert opt.execution_counts['per_param'] == 0 and _backends(opt) == {'foreach'}

LOW_CASES = ['SGD-mom', 'Adam', 'Lamb', 'ranger', 'Lion']

@pytest.mark.parametrize('rounding', roundings)
@pytest.mark.parametrize('name', LOW_CASES)
def test_foreach_bfloat16_matches_per_parameter_after_each_step(name, rounding):
    "Stored bfloat16 values within one ulp and 99% exact after every step (the reference resynchronised, as in test_engine_dtypes)"
    groups = make_groups(SHAPES3, dtype=torch.bfloat16)
    ref_groups = [[p.detach().clone() for p in g] for g in groups]
    opt, ref = OPTIMIZERS[name](groups), OPTIMIZERS[name](ref_groups)
    for o, ex in ((opt, 'foreach'), (ref, 'per_param')): o.execution, o.update_rounding, o.seed = ex, rounding, 1234
    agree, rel = Agreement(), 1e-5 if name in ('Lamb', 'ranger') else 1e-6
    for i, step_grads in enumerate(grad_stream(groups, 15)):
        run(opt, groups, [step_grads]); run(ref, ref_groups, [step_grads])
        compare_runs(opt, ref, groups, ref_groups, agree, rel, f'step {i + 1}: ')
        _resync(opt, ref, groups, ref_groups)
    assert agree.fraction >= 0.99, agree.fraction
    assert _inner(opt).execution_counts == {'fused': 15 * len(_flat(groups)), 'per_param': 0} and _backends(opt) == {'foreach'}

def test_foreach_low_precision_state_and_gradients():
    "float32 parameters with bfloat16 state, and bfloat16 parameters with float32 gradients"
    groups = make_groups(SHAPES3); ref_groups = make_groups(SHAPES3)
    opt, ref = Adam(groups, lr=1e-2, state_dtype=torch.bfloat16), Adam(ref_groups, lr=1e-2, state_dtype=torch.bfloat16)
    opt.execution, ref.execution = 'foreach', 'per_param'
    agree = Agreement()
    for i, g in enumerate(grad_stream(groups, 10)):
        run(opt, groups, [g]); run(ref, ref_groups, [g])
        compare_runs(opt, ref, groups, ref_groups, agree, 1e-6, f'step {i + 1}: ')
        _resync(opt, ref, groups, ref_groups)
    assert agree.fraction >= 0.99 and opt.execution_counts['per_param'] == 0

def test_foreach_leaves_gradients_alone_and_bumps_versions():
    groups = make_groups([[(5, 4), (3,)]])
    opt = Adam(groups, lr=1e-2, wd=1e-2, decouple_wd=False, execution='foreach')   # L2 changes the gradient, in the trace only
    ps = _flat(groups)
    for p in ps: p.grad = torch.randn(p.shape)
    grads = [p.grad.clone() for p in ps]
    opt.step()
    versions = [p._version for p in ps] + [opt.state[p][k]._version for p in ps for k in ('grad_avg', 'sqr_avg')]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))
    after = [p._version for p in ps] + [opt.state[p][k]._version for p in ps for k in ('grad_avg', 'sqr_avg')]
    assert all(a > b for a, b in zip(after, versions))

def test_backend_choice_by_execution_and_device(monkeypatch):
    cpu = torch.zeros(1).device
    assert plan.backend_for('auto', cpu) == 'cpu' and plan.backend_for('fused', cpu) == 'cpu'
    assert plan.backend_for('foreach', cpu) == 'foreach'
    monkeypatch.setattr(plan, 'has_emitter', lambda device: False)   # as CUDA, MPS or XPU tensors are today
    assert {plan.backend_for(e, cpu) for e in ('auto', 'fused', 'foreach')} == {'foreach'}

def test_auto_sends_tensors_without_an_emitter_to_foreach(monkeypatch):
    "A CPU tensor whose device is said to have no emitter runs on foreach under 'auto' (where it used to go per parameter)"
    monkeypatch.setattr(plan, 'has_emitter', lambda device: False)
    opt, ref, groups, ref_groups = _foreach_and_reference(OPTIMIZERS['Lamb'], 10, execution='auto')
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6
    assert opt.execution_counts['per_param'] == 0 and _backends(opt) == {'foreach'} and not opt.fallback_reasons

def test_changing_execution_replans_with_the_other_backend():
    groups = make_groups(SHAPES3)
    opt = Adam(groups, lr=1e-3)
    grads = grad_stream(groups, 4)
    run(opt, groups, grads[:2]); assert _backends(opt) == {'cpu'}
    opt.execution = 'foreach'; run(opt, groups, grads[2:3]); assert _backends(opt) == {'foreach'}
    opt.execution = 'auto'; run(opt, groups, grads[3:]); assert _backends(opt) == {'cpu'}
    assert opt.execution_counts['per_param'] == 0

def test_foreach_is_a_valid_setting():
    p = torch.zeros(3, requires_grad=True)
    assert Adam([p], lr=1e-3, execution='foreach').execution == 'foreach'
    with pytest.raises(ValueError, match='foreach'): Adam([p], lr=1e-3, execution='nope')

def test_backend_counts_say_which_backend_stepped(monkeypatch):
    # execution_counts says fused or per-parameter; backend_counts says which fused backend ran each parameter step
    ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
    opt = Adam(ps, lr=1e-2)
    for execution, backend in (('auto', 'cpu'), ('foreach', 'foreach')):
        opt.execution = execution
        for p in ps: p.grad = torch.randn(5)
        opt.step()
        assert opt.backend_counts[backend] == 3
    assert opt.backend_counts == {'cpu': 3, 'foreach': 3} and opt.execution_counts == {'fused': 6, 'per_param': 0}
    opt.execution = 'per_param'
    for p in ps: p.grad = torch.randn(5)
    opt.step()
    assert opt.backend_counts == {'cpu': 3, 'foreach': 3} and opt.execution_counts['per_param'] == 3
