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

def loss_of(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out, y) if y.dtype == torch.long else ((out - y)**2).mean()

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


# Optimizer accumulation: release_gradients(model, opt, accumulate=n)

from fastopt import SGD, RAdam, RMSProp, QHAdam, Larc

def double_mlp(): return mlp().double()
def double_batches(n, seed=1): return [(x.double(), y.double()) for x, y in batches(n, seed)]

def train_accumulated(model, opt, data, n, sched=None):
    "The loop of gradient accumulation: a backward per micro-batch, step/zero_grad/scheduler every n"
    for k, (x, y) in enumerate(data, start=1):
        loss_of(model, x, y).backward()
        if k % n == 0:
            opt.step(); opt.zero_grad()
            if sched: sched.step()

def test_accumulation_matches_the_formula_for_adamw_with_a_scheduler_and_groups():
    "m from the mean gradient, v from the mean squared gradient, one step (count, decay, lr) per n micro-batches"
    n, data, lr, b1, b2, eps = 3, double_batches(12), 1e-2, 0.9, 0.99, 1e-5
    model, ref = double_mlp(), double_mlp()
    opt = Adam(groups(model), lr=lr, mom=b1, sqr_mom=b2, eps=eps)   # wd 0.1 for group 0, 0.01 for group 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1/(1 + i))
    with release_gradients(model, opt, accumulate=n):
        train_accumulated(model, opt, data, n, sched)
    assert all(p.grad is None for p in model.parameters())
    wds = [0.1]*2 + [0.01]*4
    ps = list(ref.parameters())
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    for t in range(1, 5):
        gs = [torch.autograd.grad(loss_of(ref, x, y), ps) for x, y in data[(t-1)*n:t*n]]
        lr_t = lr/t
        with torch.no_grad():
            for j, p in enumerate(ps):
                p.mul_(1 - lr_t*wds[j])
                m[j] = b1*m[j] + (1-b1)*sum(g[j] for g in gs)/n
                v[j] = b2*v[j] + (1-b2)*sum(g[j]**2 for g in gs)/n
                p -= lr_t/(1 - b1**t) * m[j] / ((v[j]/(1 - b2**t)).sqrt() + eps)
    for p, q in zip(model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert all(opt.state[p]['step'] == 4 for p in model.parameters())

ACC_OPTS = {'Adam': lambda ps: Adam(ps, lr=1e-2), 'ranger': lambda ps: ranger(ps, lr=1e-2, k=2),
            'Lamb': lambda ps: Lamb(ps, lr=1e-2), 'RAdam': lambda ps: RAdam(ps, lr=1e-2),
            'SGD-momentum': lambda ps: SGD(ps, lr=1e-2, mom=0.9, wd=0.01)}

@pytest.mark.parametrize('name', list(ACC_OPTS))
def test_accumulating_identical_micro_batches_equals_the_ordinary_step(name):
    "When the micro-batches' gradients agree, the mean of squares is the square of the mean: the ordinary step"
    n, data = 2, double_batches(4)
    ref, model = double_mlp(), double_mlp()
    ro, opt = ACC_OPTS[name](groups(ref)), ACC_OPTS[name](groups(model))
    train(ref, ro, data)
    with release_gradients(model, opt, accumulate=n):
        train_accumulated(model, opt, [b for b in data for _ in range(n)], n)
    for p, q in zip(model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    if name == 'ranger': assert opt.count == ro.count == 4

def test_sgd_momentum_accumulation_equals_true_gradient_accumulation():
    "Momentum is linear in the gradient: accumulating it in the state is gradient accumulation"
    n, data = 3, double_batches(9)
    ref, model = double_mlp(), double_mlp()
    ro, opt = SGD(groups(ref), lr=1e-2, mom=0.9), SGD(groups(model), lr=1e-2, mom=0.9)
    for k, (x, y) in enumerate(data, start=1):   # true accumulation: .grad sums the mean losses / n
        (loss_of(ref, x, y)/n).backward()
        if k % n == 0: ro.step(); ro.zero_grad()
    with release_gradients(model, opt, accumulate=n): train_accumulated(model, opt, data, n)
    for p, q in zip(model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)

@pytest.mark.parametrize('make, match', [
    (lambda ps: QHAdam(ps, lr=1e-2), r"\['qhadam_step'\] have no accumulation role"),
    (lambda ps: Larc(ps, lr=1e-2), r"\['larc_layer_lr', 'larc_step'\] have no accumulation role"),
    (lambda ps: Adam(ps, lr=1e-2, decouple_wd=False), r"\['l2_reg'\]"),
    (lambda ps: SGD(ps, lr=1e-2), 'momentum_step uses the gradient itself'),
    (lambda ps: RMSProp(ps, lr=1e-2), 'rms_prop_step uses the gradient itself'),
    (lambda ps: Adam(ps, lr=1e-2, execution='fused'), "execution='fused' is strict")])
def test_accumulation_refuses_optimizers_that_read_the_gradient_at_the_step(make, match):
    model = mlp(); opt = make(model.parameters())
    with pytest.raises(ValueError, match=match): release_gradients(model, opt, accumulate=2)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())   # nothing changed
    with release_gradients(model, opt): train(model, opt, batches(1))   # release without accumulation still works

def test_accumulate_must_be_a_positive_int():
    model = mlp(); opt = Adam(model.parameters(), lr=1e-2)
    for bad, err in [(0, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(err, match='accumulate must be an int >= 1'): release_gradients(model, opt, accumulate=bad)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())

def test_no_state_dict_mid_step_and_remove():
    model, ref = mlp(), mlp()
    opt, ro = Adam(model.parameters(), lr=1e-2), Adam(ref.parameters(), lr=1e-2)
    (x, y), = batches(1)
    cbs = list(opt.cbs)
    handle = release_gradients(model, opt, accumulate=2)
    loss_of(model, x, y).backward()
    assert 'micro-batch 2 of 2' in repr(handle)
    with pytest.raises(RuntimeError, match=r'middle of an accumulated step \(1 of 2'): opt.state_dict()
    loss_of(model, x, y).backward()
    opt.state_dict()   # a step boundary
    handle.remove()
    assert all(a is b for a, b in zip(opt.cbs, cbs)) and opt.execution == 'auto'   # the callbacks and setting are back
    train(ref, ro, [(x, y)]); train(model, opt, batches(1, seed=4)); train(ref, ro, batches(1, seed=4))
    for p, q in zip(model.parameters(), ref.parameters()):   # identical micro-batches gave the ordinary step, up to rounding
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

RESUME = '''
import sys, torch, io
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_memory import double_mlp, double_batches, groups, train_accumulated, ACC_OPTS
from fastopt import release_gradients
sd = torch.load({path!r}, weights_only=True)
model = double_mlp(); opt = ACC_OPTS[{name!r}](groups(model))
model.load_state_dict(sd['model']); opt.load_state_dict(sd['opt'])
with release_gradients(model, opt, accumulate=2): train_accumulated(model, opt, double_batches(8)[4:], 2)
torch.save([p.detach() for p in model.parameters()], {out!r})
'''

@pytest.mark.parametrize('name', ['Adam', 'ranger'])
def test_accumulation_resumes_bit_exact_in_a_fresh_process(name, tmp_path):
    import subprocess, sys, os
    data = double_batches(8)
    ref = double_mlp(); ro = ACC_OPTS[name](groups(ref))
    with release_gradients(ref, ro, accumulate=2): train_accumulated(ref, ro, data, 2)
    model = double_mlp(); opt = ACC_OPTS[name](groups(model))
    with release_gradients(model, opt, accumulate=2): train_accumulated(model, opt, data[:4], 2)
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, tmp_path/'ckpt.pt')
    root, tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))
    code = RESUME.format(root=root, tests=tests, path=str(tmp_path/'ckpt.pt'), name=name, out=str(tmp_path/'w.pt'))
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': root})
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), torch.load(tmp_path/'w.pt', weights_only=True)))

def test_fastai_learner_with_accumulation_equals_the_loop():
    warnings.filterwarnings('ignore')
    from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat
    from fastopt.memory import GradientRelease
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    def model():
        torch.manual_seed(0); return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    dls = DataLoaders.from_dsets(list(zip(xs, ys)), list(zip(xs[:32], ys[:32])), bs=32, device='cpu', shuffle=False)
    learn = Learner(dls, model(), loss_func=CrossEntropyLossFlat(), opt_func=Adam, wd=0.,
                    cbs=[GradientRelease(accumulate=2)])   # wd 0: fastai exempts biases from decay
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    ref = model(); ro = Adam(ref.parameters(), lr=1e-2, wd=0.)
    with release_gradients(ref, ro, accumulate=2):
        train_accumulated(ref, ro, [(xs[i:i+32], ys[i:i+32]) for i in range(0, 256, 32)], 2)
    assert same_weights(learn.model, ref) and learn.opt.state[learn.model[0].weight]['step'] == 4
    assert learn.gradient_release.release_handle is None

def test_a_parameter_without_gradient_in_the_last_micro_batch_is_still_stepped():
    "It accumulated earlier in the step: the end of the last backward steps it, as a zero gradient would"
    def run(zero_path:bool):
        model = mlp(); opt = Adam(model.parameters(), lr=1e-2)
        (x1, y1), (x2, y2) = batches(2)
        h2 = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
        with release_gradients(model, opt, accumulate=2):
            for _ in range(2):
                loss_of(model, x1, y1).backward()   # every parameter
                loss = ((model[2:](h2) - y2)**2).mean()   # not model[0]
                if zero_path: loss = loss + 0*sum(p.sum() for p in model[0].parameters())
                loss.backward()
        assert all(p.grad is None for p in model.parameters()) and opt.state[model[0].weight]['step'] == 2
        return model
    assert same_weights(run(False), run(True))

def test_the_loop_keeps_calling_step_so_hooks_run_and_schedulers_see_a_step():
    # while gradients are released, `opt.step()` is a no-op that still runs the step hooks once per step and marks
    # the step for a torch LR scheduler: no "scheduler before optimizer" warning, one hook call per step
    import warnings
    model = torch.nn.Linear(4, 2)
    opt = fastopt.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append('pre'))
    opt.register_step_post_hook(lambda o, a, k: calls.append('post'))
    with fastopt.release_gradients(model, opt), warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward(); opt.step(); opt.zero_grad(); sched.step()
    assert calls == ['pre', 'post'] * 3
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-2 / 8)
