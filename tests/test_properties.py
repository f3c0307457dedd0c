"""Property-based tests (hypothesis): random group structures (0-d and empty tensors, float32 and float64, missing
gradients, frozen groups), random valid hyper-parameters and random callback lists built from fastopt's own
callbacks. For every draw: a step never touches a parameter without a gradient or a frozen one; state keeps the
parameter's shape, dtype and device; the fused and per-parameter strategies agree; and a state dict survives
`torch.save` / `torch.load(weights_only=True)` exactly.

CI runs a fixed set of examples (profile 'ci'); `pytest --hypothesis-profile=dev` explores many more at random."""
import io, copy
from functools import partial
import pytest, torch
from hypothesis import given, strategies as st
import fastopt
from fastopt import (Optimizer, Lookahead, weight_decay, l2_reg, average_grad, average_sqr_grad, step_stat,
                     momentum_step, sgd_step, rms_prop_step, adam_step, radam_step, qhadam_step, larc_layer_lr,
                     larc_step, lamb_step)


ADAPTIVE = [partial(average_grad, dampening=True), average_sqr_grad, step_stat]
RECIPES = {   # stats and steppers the built-in optimizers are made of, plus compositions they do not ship
    'sgd': [sgd_step],
    'momentum': [average_grad, momentum_step],
    'rmsprop': [average_sqr_grad, rms_prop_step],
    'rmsprop-mom': [average_grad, average_sqr_grad, rms_prop_step],
    'adam': ADAPTIVE + [adam_step],
    'radam': ADAPTIVE + [radam_step],
    'qhadam': [partial(average_grad, dampening=True), partial(average_sqr_grad, dampening=True), step_stat,
               qhadam_step],
    'larc': [average_grad, partial(larc_layer_lr, clip=True), larc_step],
    'lars': [partial(larc_layer_lr, clip=False), larc_step],
    'lamb': ADAPTIVE + [lamb_step],
}
DECAYS = {'none': [], 'true': [weight_decay], 'l2': [l2_reg]}

shapes = st.one_of(st.just(()), st.just((0,)), st.tuples(st.integers(1, 7)),
                   st.tuples(st.integers(1, 4), st.integers(1, 4)), st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(1, 3)))
tensor_spec = st.tuples(shapes, st.sampled_from([torch.float32, torch.float64]), st.booleans())   # has a gradient?
hypers = st.fixed_dictionaries(dict(
    lr=st.floats(1e-4, 0.1), mom=st.floats(0., 0.99), sqr_mom=st.floats(0.5, 0.999), eps=st.floats(1e-8, 1e-3),
    wd=st.floats(0., 0.1), trust_coeff=st.floats(1e-3, 0.1), beta=st.sampled_from([0., 5.]),
    nu_1=st.floats(0., 1.), nu_2=st.floats(0., 1.)))

@st.composite
def setups(draw):
    "Group structure, which groups are frozen, the callbacks, the hyper-parameters, and whether to wrap in Lookahead"
    specs = draw(st.lists(st.lists(tensor_spec, min_size=1, max_size=6), min_size=1, max_size=4))
    return dict(specs=specs, n_frozen=draw(st.integers(0, len(specs) - 1)), recipe=draw(st.sampled_from(sorted(RECIPES))),
                decay=draw(st.sampled_from(sorted(DECAYS))), hypers=draw(hypers), lookahead=draw(st.booleans()),
                n_steps=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**16)))

def build(setup, execution='auto'):
    "Parameters (with requires_grad, as in a model) and the optimizer described by `setup`"
    gen = torch.Generator().manual_seed(setup['seed'])
    groups = [[torch.randn(s, generator=gen, dtype=dt).requires_grad_() for s, dt, _ in g] for g in setup['specs']]
    opt = Optimizer(groups, DECAYS[setup['decay']] + RECIPES[setup['recipe']], **setup['hypers'])
    opt.execution = execution
    if setup['lookahead']: opt = Lookahead(opt, k=2)
    if setup['n_frozen']: opt.freeze_to(setup['n_frozen'])
    return groups, opt

def train(setup, groups, opt):
    "`n_steps` steps; frozen parameters keep a stale gradient, to check that `step` still leaves them alone"
    gen = torch.Generator().manual_seed(setup['seed'] + 1)
    for _ in range(setup['n_steps']):
        for g, spec in zip(groups, setup['specs']):
            for p, (_, _, has_grad) in zip(g, spec):
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) if has_grad else None
        opt.step()

def untouchable(setup, groups):
    return [(i, j) for i, (g, spec) in enumerate(zip(groups, setup['specs'])) for j, (_, _, has_grad) in enumerate(spec)
            if i < setup['n_frozen'] or not has_grad]

@given(setups())
def test_step_never_touches_parameters_without_gradient_or_frozen(setup):
    groups, opt = build(setup)
    before = [[p.detach().clone() for p in g] for g in groups]
    train(setup, groups, opt)
    for i, j in untouchable(setup, groups):
        assert torch.equal(groups[i][j], before[i][j]), f'parameter {j} of group {i} moved'
        assert not any(isinstance(v, torch.Tensor) for v in opt.state[groups[i][j]].values())

@given(setups())
def test_state_keeps_the_parameters_shape_dtype_and_device(setup):
    groups, opt = build(setup)
    train(setup, groups, opt)
    for p in (p for g in groups for p in g):
        for k, v in opt.state[p].items():
            if not isinstance(v, torch.Tensor): continue
            assert v.dtype == p.dtype and v.device == p.device, k
            assert v.shape == p.shape or (k == 'local_lr' and v.dim() == 0), (k, v.shape, p.shape)   # LARC's rate is per tensor
    if setup['lookahead'] and opt.slow_weights is not None:
        for p, s in zip((p for g in groups for p in g), (s for g in opt.slow_weights for s in g)):
            assert s.shape == p.shape and s.dtype == p.dtype and s.device == p.device

@given(setups())
def test_fused_and_per_parameter_agree(setup):
    (fused_ps, fused), (ref_ps, ref) = build(setup, 'auto'), build(setup, 'per_param')
    train(setup, fused_ps, fused); train(setup, ref_ps, ref)
    inner = fused.opt if setup['lookahead'] else fused
    n_grad = sum(has for i, g in enumerate(setup['specs']) for _, _, has in g if i >= setup['n_frozen'])
    assert inner.execution_counts['fused'] == n_grad * setup['n_steps'] and inner.execution_counts['per_param'] == 0
    for p, q in zip((p for g in fused_ps for p in g), (q for g in ref_ps for q in g)):
        tol = 1e-5 if p.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(p, q, rtol=tol, atol=tol * (1 + q.abs().max().item() if q.numel() else 1))
        for k, v in ref.state[q].items():
            w = fused.state[p][k]
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(w, v, rtol=tol, atol=tol * (1 + v.abs().max().item() if v.numel() else 1))
            else: assert w == v, k

def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b

@given(setups())
def test_state_dict_round_trip_through_torch_save_is_exact(setup):
    groups, opt = build(setup)
    train(setup, groups, opt)
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh_groups = [[p.detach().clone().requires_grad_() for p in g] for g in groups]
    fresh = Optimizer(fresh_groups, DECAYS[setup['decay']] + RECIPES[setup['recipe']], lr=1.)
    if setup['lookahead']: fresh = Lookahead(fresh, k=2)
    fresh.load_state_dict(loaded)
    assert _equal(fresh.state_dict(), opt.state_dict())
    # and the next step is the same, bit for bit
    if setup['n_frozen']: fresh.freeze_to(setup['n_frozen'])
    for g, h in zip(groups, fresh_groups):
        for p, q in zip(g, h):
            if p.numel() and (p.grad is not None): q.grad = torch.ones_like(q); p.grad = torch.ones_like(p)
    opt.step(); fresh.step()
    for g, h in zip(groups, fresh_groups):
        for p, q in zip(g, h): assert torch.equal(p, q)
