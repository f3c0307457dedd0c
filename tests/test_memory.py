"""Gradient release (`fastopt.memory`): stepping each parameter during backward gives the ordinary loop's weights
bit for bit, with groups, a scheduler, Lookahead, freezing, NaN checks, state dicts and a fastai Learner."""
import copy, io, warnings
import pytest, torch
from torch import nn
import fastopt
from fastopt import Adam, Lamb, ranger, release_gradients, NonFiniteGradError

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))

def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]

def groups(model):
    return [{'params': list(model[0].parameters()), 'wd': 0.1}, {'params': list(model[2:].parameters())}]

def loss_of(model, x, y): return ((model(x) - y)**2).mean()

def train(model, opt, data, sched=None):
    "The ordinary loop; with gradient release on, its step and zero_grad are no-ops"
    losses = []
    for x, y in data:
        loss = loss_of(model, x, y); loss.backward()
        opt.step(); opt.zero_grad()
        if sched: sched.step()
        losses.append(loss.item())
    return losses

def same_weights(a, b): return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

OPTS = {'Adam': lambda ps: Adam(ps, lr=1e-2), 'ranger': lambda ps: ranger(ps, lr=1e-2, k=3),
        'Lamb': lambda ps: Lamb(ps, lr=1e-2)}

@pytest.mark.parametrize('name', list(OPTS))
def test_release_is_bit_identical_to_the_ordinary_step_with_a_scheduler(name):
    runs = []
    for release in (False, True):
        model = mlp(); opt = OPTS[name](groups(model))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1/(1 + i))   # lr changes every step
        handle = release_gradients(model, opt) if release else None
        runs.append((model, opt, train(model, opt, batches(7), sched)))
        if handle: assert all(p.grad is None for p in model.parameters())
    (m1, o1, l1), (m2, o2, l2) = runs
    assert l1 == l2 and same_weights(m1, m2)
    if name == 'ranger': assert o1.count == o2.count == 7   # synchronised at steps 3 and 6 in both
    assert o2.execution_counts['per_param'] == 0   # fused, one parameter at a time

def test_frozen_groups_are_not_stepped():
    model = mlp(); opt = Adam(groups(model), lr=1e-2); opt.freeze()
    before = copy.deepcopy(model)
    with release_gradients(model, opt): train(model, opt, batches(3))
    assert same_weights(model[0], before[0]) and not same_weights(model[2], before[2])
    assert model[0].weight not in opt.state or not opt.state[model[0].weight]

def test_a_parameter_without_hook_is_stepped_when_the_backward_ends():
    "Unfrozen after release_gradients: no hook, but the end of the backward steps it (as `step` would)"
    ref, model = mlp(), mlp()
    ro, opt = Adam(groups(ref), lr=1e-2), Adam(groups(model), lr=1e-2)
    ro.freeze(); opt.freeze()
    with release_gradients(model, opt):
        ro.unfreeze(); opt.unfreeze()
        train(ref, ro, batches(3)); train(model, opt, batches(3))
    assert same_weights(ref, model) and all(p.grad is None for p in model.parameters())

def test_remove_restores_the_ordinary_behaviour():
    model, ref = mlp(), mlp()
    opt, ro = Adam(groups(model), lr=1e-2), Adam(groups(ref), lr=1e-2)
    handle = release_gradients(model, opt)
    with pytest.raises(ValueError, match='already releases'): release_gradients(model, opt)
    train(model, opt, batches(2)); train(ref, ro, batches(2))
    handle.remove(); handle.remove()   # twice is harmless
    assert not handle.active
    x, y = batches(1, seed=5)[0]
    loss_of(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())   # kept for the ordinary step
    opt.step(); opt.zero_grad()
    loss_of(ref, x, y).backward(); ro.step(); ro.zero_grad()
    assert same_weights(model, ref)
    with pytest.raises(ValueError, match='not parameters of the model'):
        release_gradients(mlp(), ranger(mlp().parameters(), lr=1e-2))

def test_lookahead_step_is_a_no_op_while_released_and_counts_again_after():
    model = mlp(); opt = ranger(model.parameters(), lr=1e-2, k=2)
    with release_gradients(model, opt):
        assert opt.steps_in_backward
        train(model, opt, batches(3))
        assert opt.count == 3
        opt.step(); opt.step()   # nothing to count: the backwards did
        assert opt.count == 3
    assert not opt.steps_in_backward
    train(model, opt, batches(1)); assert opt.count == 4

def test_nonfinite_raise_names_the_parameter_and_what_was_already_stepped():
    model = mlp(); opt = Adam(model.parameters(), lr=1e-2, nonfinite_grads='raise')
    poison = model[2].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float('nan')))
    before = copy.deepcopy(model)
    with release_gradients(model, opt) as handle:
        x, y = batches(1)[0]
        with pytest.raises(NonFiniteGradError) as e: loss_of(model, x, y).backward()
        msg = str(e.value)
        assert msg.startswith('the gradient of parameter 2 of group 0') and 'cannot be undone' in msg
        assert len(handle.stepped) in (2, 3) and f'already stepped {len(handle.stepped)} parameters' in msg
        assert 'parameter 4 of group 0' in msg and 'parameter 5 of group 0' in msg
        assert not same_weights(model[4], before[4]) and same_weights(model[0], before[0])   # the last layer moved
        assert torch.equal(model[2].weight, before[2].weight) and model[2].weight.grad.isnan().any()   # kept
        model[2].weight.grad = None; poison.remove()
        train(model, opt, batches(1, seed=3))   # the next backward is a whole step
        assert not same_weights(model[0], before[0]) and all(p.grad is None for p in model.parameters())

def test_lookahead_nonfinite_raise_during_release():
    model = mlp(); opt = ranger(model.parameters(), lr=1e-2, k=2); opt.nonfinite_grads = 'raise'
    model[0].bias.register_hook(lambda g: g*float('inf'))
    with release_gradients(model, opt):
        x, y = batches(1)[0]
        with pytest.raises(NonFiniteGradError, match='parameter 1 of group 0'): loss_of(model, x, y).backward()
    assert opt.count == 0   # a partial step is not counted

def test_state_dict_save_load_and_continue_bit_exact():
    data = batches(8)
    ref = mlp(); ro = ranger(groups(ref), lr=1e-2, k=3); train(ref, ro, data)
    model = mlp(); opt = ranger(groups(model), lr=1e-2, k=3)
    with release_gradients(model, opt): train(model, opt, data[:4])
    buf = io.BytesIO(); torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = mlp(); ropt = ranger(groups(resumed), lr=1e-2, k=3)
    resumed.load_state_dict(sd['model']); ropt.load_state_dict(sd['opt'])
    with release_gradients(resumed, ropt): train(resumed, ropt, data[4:])
    assert same_weights(ref, resumed) and ropt.count == ro.count == 8

def test_a_backward_from_a_tensor_subclass_still_fuses():
    "fastai's TensorBase loss runs backward with __torch_function__ overrides off; the step turns them back on"
    model = mlp(); opt = Adam(model.parameters(), lr=1e-2)
    with release_gradients(model, opt):
        x, y = batches(1)[0]
        loss = loss_of(model, x, y)
        with torch._C.DisableTorchFunctionSubclass(): loss.backward()
    assert opt.execution_counts == {'fused': 6, 'per_param': 0} and opt.fallback_reasons == []

def test_user_errors():
    model = mlp()
    with pytest.raises(TypeError, match='takes an nn.Module'): release_gradients(Adam(model.parameters(), lr=1e-2), model)
    with pytest.raises(TypeError, match='needs a fastopt Optimizer'): release_gradients(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match='needs a fastopt Optimizer'):
        release_gradients(model, fastopt.OptimWrapper(model.parameters(), torch.optim.AdamW))

def test_fastai_learner_with_gradient_release_equals_the_ordinary_learner():
    warnings.filterwarnings('ignore')
    from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat
    import fastai.callback.schedule
    from fastai.callback.training import GradientClip
    from fastopt.memory import GradientRelease
    g = torch.Generator().manual_seed(0)
    templates, y = torch.rand(10, 64, generator=g), torch.randint(0, 10, (448,), generator=g)
    ds = list(zip(templates[y] + 0.3*torch.randn(448, 64, generator=g), y))   # digits-like: noisy class templates
    def learner(*cbs):
        dls = DataLoaders.from_dsets(ds[64:], ds[:64], bs=64, device='cpu', shuffle=False)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=ranger, cbs=list(cbs))
    plain, released = learner(), learner(GradientRelease())
    for learn in (plain, released):
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    assert [float(l) for l in plain.recorder.losses] == [float(l) for l in released.recorder.losses]
    assert same_weights(plain.model, released.model) and plain.opt.count == released.opt.count == 12
    assert released.gradient_release.release_handle is None and not released.opt.steps_in_backward
    clash = learner(GradientRelease(), GradientClip())
    with pytest.raises(ValueError, match='GradientClip'), clash.no_bar(), clash.no_logging(): clash.fit(1)
