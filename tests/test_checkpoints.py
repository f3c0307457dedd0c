"""Checkpoints of fastai 2.8's own optimizers load into fastopt's: fastai trains N steps, its state dict is
converted, then fastai and fastopt take M more steps with the same gradients and must agree (1e-6 relative, as
the parity tests). Also through `Learner.save(with_opt=True)`, and every mismatch is a ValueError naming it."""
import copy, pytest, torch
from torch import nn
import fastai.optimizer as fai
import fastopt
from fastopt.checkpoints import is_fastai_state_dict, from_fastai_state_dict
from helpers import SHAPES, make_groups, clone_groups, gradient_stream, run

N, M = 7, 20   # fastai's steps before the checkpoint (mid-cycle for k=3 and k=6), fastopt's after it

def _close(xs, ys):
    for a, b in zip(xs, ys): torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

CASES = {   # name: (fastai's factory, fastopt's), each from groups
    'Adam':        (lambda ps: fai.Adam(ps, lr=slice(1e-3, 1e-2), wd=1e-2), lambda ps: fastopt.Adam(ps, lr=1e-3, wd=1e-2)),
    'Adam-L2':     (lambda ps: fai.Adam(ps, lr=1e-2, wd=1e-2, decouple_wd=False),
                    lambda ps: fastopt.Adam(ps, lr=1e-2, wd=1e-2, decouple_wd=False)),
    'SGD-mom':     (lambda ps: fai.SGD(ps, lr=1e-2, mom=0.9), lambda ps: fastopt.SGD(ps, lr=1e-2, mom=0.9)),
    'RMSProp-mom': (lambda ps: fai.RMSProp(ps, lr=1e-3, mom=0.9), lambda ps: fastopt.RMSProp(ps, lr=1e-3, mom=0.9)),
    'Lamb':        (lambda ps: fai.Lamb(ps, lr=1e-2), lambda ps: fastopt.Lamb(ps, lr=1e-2)),
    'ranger':      (lambda ps: fai.ranger(ps, lr=slice(1e-3, 1e-2)), lambda ps: fastopt.ranger(ps, lr=1e-3)),
    'ranger-k3':   (lambda ps: fai.ranger(ps, lr=1e-2, k=3, alpha=0.7), lambda ps: fastopt.ranger(ps, lr=1e-2, k=3, alpha=0.7)),
    'Lookahead-SGD': (lambda ps: fai.Lookahead(fai.SGD(ps, lr=1e-2, mom=0.9), k=4),
                      lambda ps: fastopt.Lookahead(fastopt.SGD(ps, lr=1e-2, mom=0.9), k=4)),
}

@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('how', ['convert', 'load_state_dict'])
def test_fastai_checkpoint_continues_in_fastopt(case, how, request):
    make_fai, make_ours = CASES[case]
    theirs = make_groups(SHAPES)
    grads = gradient_stream(theirs, N + M)
    fai_opt = make_fai(theirs)
    run(fai_opt, theirs, grads[:N])
    sd = fai_opt.state_dict()
    assert is_fastai_state_dict(sd)
    ours = clone_groups(theirs)                      # identical weights at the checkpoint
    opt = make_ours(ours)
    opt.load_state_dict(from_fastai_state_dict(opt, sd) if how == 'convert' else sd)
    assert [dict(h) for h in opt.hypers] == [dict(h) for h in fai_opt.hypers]
    if hasattr(fai_opt, 'count'): assert opt.count == N
    _close(run(opt, ours, grads[N:]), run(fai_opt, theirs, grads[N:]))

def test_conversion_format_and_no_mutation():
    theirs = make_groups(SHAPES); fai_opt = fai.ranger(theirs, lr=1e-2, k=3)
    run(fai_opt, theirs, gradient_stream(theirs, 4))
    sd = fai_opt.state_dict(); before = copy.deepcopy(sd)
    opt = fastopt.ranger(clone_groups(theirs), lr=1e-2, k=3)
    res = from_fastai_state_dict(opt, sd)
    assert set(res) == {'state', 'param_groups', 'count', 'slow_weights'}   # fastai's dict cannot name callbacks
    assert [g['params'] for g in res['param_groups']] == [[0, 1], [2, 3, 4]] and sorted(res['state']) == [0, 1, 2, 3, 4]
    assert set(sd) == set(before) and sd['count'] == before['count'] == 4
    for a, b in zip(sd['state'], before['state']): assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    # torch-style dicts are not fastai's
    assert not is_fastai_state_dict(opt.state_dict()) and not is_fastai_state_dict(None)
    assert not is_fastai_state_dict(torch.optim.AdamW([torch.zeros(1)]).state_dict())

def _fai_adam_sd(shapes=SHAPES, steps=3, make=lambda ps: fai.Adam(ps, lr=1e-2)):
    ps = make_groups(shapes); opt = make(ps); run(opt, ps, gradient_stream(ps, steps))
    return opt.state_dict()

@pytest.mark.parametrize('make_target,sd_args,msg', [
    (lambda: fastopt.Adam(make_groups(SHAPES)[0], lr=1e-2), {}, 'hyper-parameters for 2 parameter groups; the optimizer has 1'),
    (lambda: fastopt.Adam(make_groups([[(5, 4)], [(3, 3, 2), (7,), ()]]), lr=1e-2), {}, 'state for 5 parameters; the optimizer has 4'),
    (lambda: fastopt.Adam(make_groups([[(5, 4), (3,)], [(3, 3, 2), (7,), ()]]), lr=1e-2), {},
     r"'grad_avg' of parameter 1 \(parameter 1 of group 0\) has shape \(4,\); the parameter has shape \(3,\)"),
    (lambda: fastopt.Adam(make_groups(SHAPES, dtype=torch.float64), lr=1e-2), {}, 'has dtype torch.float32; the parameter has dtype torch.float64'),
    (lambda: fastopt.SGD(make_groups(SHAPES), lr=1e-2, mom=0.9), {},
     r"hyper-parameters \['eps', 'sqr_mom'\] are not this optimizer's"),
    (lambda: fastopt.RAdam(make_groups(SHAPES), lr=1e-2), {}, r"lack \['beta'\]"),
    (lambda: fastopt.ranger(make_groups(SHAPES), lr=1e-2), {}, 'saved by a plain optimizer'),
    (lambda: fastopt.RAdam(make_groups(SHAPES), lr=1e-2), dict(make=lambda ps: fai.ranger(ps, lr=1e-2)),
     'load it into a fastopt Lookahead'),
    (lambda: fastopt.OptimWrapper(make_groups(SHAPES), torch.optim.AdamW), {}, 'not into OptimWrapper'),
    (lambda: torch.optim.AdamW(make_groups(SHAPES)[0]), {}, 'not into AdamW'),
])
def test_mismatch_is_named(make_target, sd_args, msg):
    sd, target = _fai_adam_sd(**sd_args), make_target()
    err = TypeError if 'not into' in msg else ValueError
    with pytest.raises(err, match=msg): from_fastai_state_dict(target, sd)

def test_unused_fastai_state_is_refused():
    "A state name the target's callbacks do not keep (here a user stat's) is never loaded silently"
    sd = _fai_adam_sd()
    sd['state'][2]['my_stat'] = torch.zeros(3, 3, 2)
    with pytest.raises(ValueError, match=r"parameter 2 \(parameter 0 of group 1\) has \['grad_avg', 'my_stat'"):
        from_fastai_state_dict(fastopt.Adam(make_groups(SHAPES), lr=1e-2), sd)

def test_bad_slow_weights_change_nothing():
    theirs = make_groups(SHAPES); fai_opt = fai.ranger(theirs, lr=1e-2, k=3); run(fai_opt, theirs, gradient_stream(theirs, 4))
    sd = fai_opt.state_dict()
    sd['slow_weights'] = [sd['slow_weights'][0], sd['slow_weights'][1][:2]]
    ours = clone_groups(theirs); opt = fastopt.ranger(ours, lr=1e-2, k=3); run(opt, ours, gradient_stream(ours, 2))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="group 1: fastai's state dict has 2 slow weights; the group has 3 parameters"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after['count'] == before['count'] == 2
    for a, b in zip(after['slow_weights'][1], before['slow_weights'][1]): assert torch.equal(a, b)
    with pytest.raises(ValueError, match="invalid Lookahead step count: -1"):
        from_fastai_state_dict(opt, {**fai_opt.state_dict(), 'count': -1})

# ---- through a fastai Learner: Learner.save(with_opt=True) writes {'model': ..., 'opt': opt.state_dict()} ----

def _learner(opt_func, tmp_path):
    from fastai.basics import Learner, DataLoaders, MSELossFlat
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g); y = x @ torch.tensor([[1.], [-2.], [0.5], [3.]])
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[32:], ds[:32], bs=16, shuffle=False, device='cpu')
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    splitter = lambda m: [list(m[:3].parameters()), list(m[3].parameters())]
    return Learner(dls, model, loss_func=MSELossFlat(), opt_func=opt_func, splitter=splitter, path=tmp_path, wd=0.1)

@pytest.mark.parametrize('fai_opt_func,make_ours', [
    (fai.Adam, lambda ps: fastopt.Adam(ps, lr=1e-3)),
    (fai.ranger, lambda ps: fastopt.ranger(ps, lr=1e-3)),
], ids=['Adam', 'ranger'])
def test_learner_save_with_opt_loads_into_fastopt(fai_opt_func, make_ours, tmp_path):
    import fastai.callback.schedule  # fit_one_cycle
    learn = _learner(fai_opt_func, tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)   # numpy hypers, do_wd flags on BN and biases
    learn.save('ckpt', with_opt=True)
    ckpt = torch.load(tmp_path/'models'/'ckpt.pth', weights_only=False)   # fastai's hypers are fastcore `L`s
    assert set(ckpt) == {'model', 'opt'} and is_fastai_state_dict(ckpt['opt'])
    assert any(s.get('do_wd') is False for s in ckpt['opt']['state'])
    model = copy.deepcopy(learn.model); model.load_state_dict(ckpt['model'])
    groups = [list(model[:3].parameters()), list(model[3].parameters())]
    opt = make_ours(groups)
    sd = from_fastai_state_dict(opt, ckpt['opt'])
    opt.load_state_dict(sd)
    assert [h['lr'] for h in opt.hypers] == pytest.approx([h['lr'] for h in learn.opt.hypers])
    assert all(type(v) in (int, float, bool) for h in opt.hypers for v in h.values())   # no numpy numbers kept
    # continue with the same gradients: fastopt from the checkpoint, fastai's optimizer in the Learner
    theirs = [p for g in learn.opt.param_lists for p in g]
    ours = [p for g in groups for p in g]
    gen = torch.Generator().manual_seed(3)
    for _ in range(M):
        for a, b in zip(theirs, ours): b.grad = torch.randn(b.shape, generator=gen); a.grad = b.grad.clone()
        learn.opt.step(); opt.step()
    _close(ours, theirs)
