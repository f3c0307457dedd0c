"""Non-finite gradients. By default a NaN or inf gradient propagates into its own parameter and no further (the
Guarantees page shows what each optimizer makes of it); GradScaler skips such steps; `nonfinite_grads='raise'`
stops the step before anything changes, naming the parameter."""
import copy, pytest, torch
from torch import nn
import fastopt
from fastopt import NonFiniteGradError, check_finite_grads
from helpers import make_groups, clone_groups, gradient_stream, run, zoo, SHAPES

ZOO = zoo()
BAD = {'nan': float('nan'), 'inf': float('inf'), '-inf': float('-inf')}

def _set_execution(opt, execution):
    if execution != 'auto' and not isinstance(getattr(opt, 'opt', None), torch.optim.AdamW): opt.execution = execution

def _poisoned(grads, value):
    "The gradient stream with one element of parameter 1 of group 1 (flat index 3) made non-finite at step 2"
    grads = [[g.clone() for g in step] for step in grads]
    grads[2][3].view(-1)[5] = value
    return grads

@pytest.mark.parametrize('execution', ['auto', 'per_param'])
@pytest.mark.parametrize('bad', list(BAD))
@pytest.mark.parametrize('name', list(ZOO))
def test_nonfinite_gradient_stays_in_its_parameter(name, bad, execution):
    groups, clean = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(groups, 5)
    opt, ref = ZOO[name](groups), ZOO[name](clean)
    _set_execution(opt, execution); _set_execution(ref, execution)
    flat = run(opt, groups, _poisoned(grads, BAD[bad]))
    flat_ref = run(ref, clean, grads)
    for i, (p, q) in enumerate(zip(flat, flat_ref)):
        if i == 3: assert not p.isfinite().all(), 'the bad gradient reaches its parameter'
        else: assert torch.equal(p, q), f'parameter {i} was affected by another parameter\'s bad gradient'

@pytest.mark.parametrize('name', list(ZOO))
def test_grad_scaler_skips_overflowing_steps(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = ZOO[name](model.parameters())
    scaler = torch.amp.GradScaler('cpu', init_scale=2.**127)   # any gradient times this overflows
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(12, 5), torch.randn(12, 2)
    scaler.scale(1e4 * nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt); scaler.update()
    for k, v in model.state_dict().items(): assert torch.equal(v, before[k])
    assert scaler.get_scale() < 2.**127
    assert all(not any(isinstance(v, torch.Tensor) and v.numel() > 0 for v in s.values()) for s in opt.state.values())

def _snapshot(opt, flat):
    sd = copy.deepcopy(opt.state_dict())
    return [p.detach().clone() for p in flat], sd

def _assert_same(a, b):
    if isinstance(a, torch.Tensor): assert torch.equal(a, b); return
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a: _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b): _assert_same(x, y)
    else: assert a == b

@pytest.mark.parametrize('bad', list(BAD))
@pytest.mark.parametrize('name', list(ZOO))
def test_raise_on_nonfinite_names_the_parameter_and_changes_nothing(name, bad):
    groups = make_groups(SHAPES)
    grads = _poisoned(gradient_stream(groups, 3), BAD[bad])
    opt = ZOO[name](groups)
    opt.nonfinite_grads = 'raise'
    flat = run(opt, groups, grads[:2])
    weights, sd = _snapshot(opt, flat)
    for p, g in zip(flat, grads[2]): p.grad = g.clone()
    with pytest.raises(NonFiniteGradError, match=r'parameter 1 of group 1 \(shape \(7,\)\) holds ' +
                       ('1 NaN and 0 inf' if bad == 'nan' else '0 NaN and 1 inf') + ' of 7 values'):
        opt.step()
    for p, w in zip(flat, weights): assert torch.equal(p, w)
    _assert_same(opt.state_dict(), sd)
    # once the gradient is fixed, training goes on
    flat[3].grad = torch.zeros(7); opt.step()
    assert all(p.isfinite().all() for p in flat)

def test_raise_ignores_frozen_parameters_and_missing_gradients():
    groups = make_groups(SHAPES)
    opt = fastopt.Adam(groups, lr=1e-2)
    opt.nonfinite_grads = 'raise'
    for g in groups[0]: g.grad = torch.full_like(g, float('nan'))   # stale gradients of a group about to be frozen
    groups[1][0].grad = torch.ones_like(groups[1][0])
    opt.freeze()
    before = [p.detach().clone() for g in groups for p in g]
    opt.step()
    flat = [p for g in groups for p in g]
    assert all(torch.equal(p, b) for p, b in zip(flat, before) if p is not groups[1][0])
    assert not torch.equal(groups[1][0], before[2])

def test_check_finite_grads_on_its_own():
    ps = [torch.zeros(3), torch.zeros(0), torch.zeros((), dtype=torch.float64)]
    for p in ps: p.grad = torch.zeros_like(p)
    check_finite_grads([ps])                       # all finite, empty and 0-d included: no error
    ps[2].grad.fill_(float('inf'))
    with pytest.raises(NonFiniteGradError, match=r'parameter 2 of group 0 \(shape \(\)\) holds 0 NaN and 1 inf of 1'):
        check_finite_grads([ps])

@pytest.mark.parametrize('bad_value', ['skip', None, True])
def test_nonfinite_policy_is_checked(bad_value):
    opt = fastopt.SGD([torch.zeros(1)], lr=0.1)
    with pytest.raises(ValueError, match=r"nonfinite_grads must be one of \('propagate', 'raise'\)"):
        opt.nonfinite_grads = bad_value
    assert opt.nonfinite_grads == 'propagate'
