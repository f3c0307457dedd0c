"""fastopt optimizers in plain PyTorch loops: torch's LR schedulers (momentum cycling included), GradScaler,
step hooks and torch.save round trips. What a scheduler writes into `param_groups` is what the next step uses."""
import io, pytest, torch
from torch import nn
from torch.optim import lr_scheduler as sched
import fastopt
from fastopt import Adam, SGD, RAdam, Lamb, ranger, Lookahead

def _model(): torch.manual_seed(0); return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 5, generator=g), torch.randn(12, 2, generator=g)) for _ in range(n)]
def _loss(model, batch): return nn.functional.mse_loss(model(batch[0]), batch[1])

SCHEDULERS = {
    'StepLR':      lambda o, n: sched.StepLR(o, step_size=3, gamma=0.5),
    'LambdaLR':    lambda o, n: sched.LambdaLR(o, lambda i: 1/(1+i)),
    'Cosine':      lambda o, n: sched.CosineAnnealingLR(o, T_max=n),
    'OneCycle':    lambda o, n: sched.OneCycleLR(o, max_lr=1e-2, total_steps=n),   # cycles momentum too
    'Sequential':  lambda o, n: sched.SequentialLR(o, [sched.LinearLR(o, 0.1, total_iters=4),
                                                      sched.ExponentialLR(o, 0.9)], milestones=[4]),
}
OPTIMIZERS = {
    'Adam':   lambda ps: Adam(ps, lr=1e-2),
    'SGD':    lambda ps: SGD(ps, lr=1e-2, mom=0.9),
    'ranger': lambda ps: ranger(ps, lr=1e-2),
}

def _schedule(name, n):
    "The lr (and momentum) per step that scheduler `name` produces, read from a torch SGD it drives"
    ref = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2, momentum=0.9)
    s = SCHEDULERS[name](ref, n); out = []
    for _ in range(n):
        out.append((ref.param_groups[0]['lr'], ref.param_groups[0]['momentum'])); ref.step(); s.step()
    return out

@pytest.mark.parametrize('opt_name', list(OPTIMIZERS))
@pytest.mark.parametrize('sched_name', list(SCHEDULERS))
def test_scheduler_drives_fastopt_like_setting_hypers_by_hand(opt_name, sched_name):
    n, batches = 12, _batches(12)
    model = _model(); opt = OPTIMIZERS[opt_name](model.parameters()); s = SCHEDULERS[sched_name](opt, n)
    seen = []
    for b in batches:
        seen.append((opt.hypers[0]['lr'], opt.hypers[0]['mom']))
        opt.zero_grad(); _loss(model, b).backward(); opt.step(); s.step()
    ref = _model(); ref_opt = OPTIMIZERS[opt_name](ref.parameters())
    expected = _schedule(sched_name, n)
    for (lr, mom), b in zip(expected, batches):
        ref_opt.set_hyper('lr', lr)
        if sched_name == 'OneCycle': ref_opt.set_hyper('mom', mom)
        ref_opt.zero_grad(); _loss(ref, b).backward(); ref_opt.step()
    assert [lr for lr, _ in seen] == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    if sched_name == 'OneCycle': assert [m for _, m in seen] == pytest.approx([m for _, m in expected], rel=1e-12)
    for a, b in zip(model.parameters(), ref.parameters()): assert torch.equal(a, b)

def test_momentum_aliases_are_views_not_copies():
    opt = Adam([torch.zeros(2)], lr=1e-3)
    g = opt.param_groups[0]
    assert 'betas' in opt.defaults and 'momentum' in opt.defaults and g['betas'] == (0.9, 0.99)
    g['betas'] = (0.8, 0.95)
    assert opt.hypers[0]['mom'] == 0.8 and opt.hypers[0]['sqr_mom'] == 0.95
    assert 'betas' not in opt.hypers[0] and 'betas' not in opt.state_dict()['param_groups'][0]
    sgd = SGD([torch.zeros(2)], lr=1e-3, mom=0.9)
    assert 'momentum' in sgd.defaults and 'betas' not in sgd.defaults

@pytest.mark.parametrize('make_opt', [lambda ps: Adam(ps, lr=1e-2), lambda ps: ranger(ps, lr=1e-2),
                                      lambda ps: Lamb(ps, lr=1e-2)], ids=['Adam', 'ranger', 'Lamb'])
def test_grad_scaler_skips_overflowing_step(make_opt):
    model = _model(); opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler('cpu', init_scale=2.**127)   # any gradient times this overflows
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast('cpu', dtype=torch.bfloat16): loss = 1e4 * _loss(model, _batches(1)[0])
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(opt); scaler.update()
    for a, b in zip(model.parameters(), before): assert torch.equal(a, b)
    assert scaler.get_scale() < 2.**127
    assert all(len(s) == 0 or 'step' not in s for s in opt.state.values())   # no stat was updated either

def test_grad_scaler_with_clipping_steps_normally():
    model = _model(); opt = Adam(model.parameters(), lr=1e-2)
    ref = _model(); ref_opt = Adam(ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.)
    for b in _batches(3):
        opt.zero_grad(); scaler.scale(_loss(model, b)).backward(); scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.5); scaler.step(opt); scaler.update()
        ref_opt.zero_grad(); _loss(ref, b).backward(); nn.utils.clip_grad_norm_(ref.parameters(), 0.5); ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('make_opt', [lambda ps: RAdam(ps, lr=1e-2), lambda ps: ranger(ps, lr=1e-2)], ids=['RAdam', 'ranger'])
def test_step_hooks_fire(make_opt):
    model = _model(); opt = make_opt(model.parameters()); calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append('pre'))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append('post'))
    _loss(model, _batches(1)[0]).backward(); opt.step()
    assert calls == ['pre', 'post']

def test_load_pre_hooks_edit_a_copy_of_the_callers_dict():
    # as torch.optim does: a pre-hook may edit the dict it is given (here: drop the fastai-style extra key it added)
    # without the caller's checkpoint changing under it
    model = _model(); opt = Adam(model.parameters(), lr=1e-2)
    _loss(model, _batches(1)[0]).backward(); opt.step()
    sd = opt.state_dict(); sd['extra'] = 'kept by the caller'
    opt.register_load_state_dict_pre_hook(lambda o, d: d.pop('extra') and None)
    opt.load_state_dict(sd)
    assert sd['extra'] == 'kept by the caller'

@pytest.mark.parametrize('make_opt', list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_save_load_round_trip_with_scheduler(make_opt):
    batches = _batches(10)
    def build():
        m = _model(); o = make_opt(m.parameters()); return m, o, sched.OneCycleLR(o, max_lr=1e-2, total_steps=10)
    def train(m, o, s, bs):
        for b in bs: o.zero_grad(); _loss(m, b).backward(); o.step(); s.step()
    ref = build(); train(*ref, batches)
    m, o, s = build(); train(m, o, s, batches[:4])
    buf = io.BytesIO(); torch.save({'m': m.state_dict(), 'o': o.state_dict(), 's': s.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2, o2, s2 = build(); m2.load_state_dict(ck['m']); o2.load_state_dict(ck['o']); s2.load_state_dict(ck['s'])
    train(m2, o2, s2, batches[4:])
    for a, b in zip(m2.parameters(), ref[0].parameters()): assert torch.equal(a, b)

def test_checkpoint_from_before_a_scheduler_loads_after_one_was_created():
    "Only the optimizer's own hyper-parameters must be in the checkpoint; a scheduler's bookkeeping keys stay"
    w = torch.zeros(3); w.grad = torch.ones(3)
    opt = Adam([w], lr=1e-3, wd=0.); opt.step(); sd = opt.state_dict()
    opt2 = Adam([torch.zeros(3)], lr=1e-3, wd=0.)
    s = sched.OneCycleLR(opt2, max_lr=1e-2, total_steps=10)
    opt2.load_state_dict(sd)
    g = opt2.param_groups[0]
    assert g['max_lr'] == 1e-2 and 'initial_lr' in g and opt2.state[g['params'][0]]['step'] == 1
    g['params'][0].grad = torch.ones(3); opt2.step()
    s.step()   # the scheduler still finds its keys
    assert opt2.state[g['params'][0]]['step'] == 2

def test_grad_scaler_with_lookahead_over_a_fused_torch_optimizer():
    "A wrapper never inherits private flags of the optimizer it wraps: fused AdamW's amp-scaling step is not Lookahead's"
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    assert getattr(inner, '_step_supports_amp_scaling', False)
    opt = Lookahead(inner, k=2)
    assert not getattr(opt, '_step_supports_amp_scaling', False)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.)
    for b in _batches(4):
        opt.zero_grad(); scaler.scale(_loss(model, b)).backward(); scaler.step(opt); scaler.update()
    assert opt.count == 4 and len(opt.slow_weights[0]) == 4
