"""Lookahead and ranger: parity with fastai 2.8 step for step, reductions to the inner optimizer, exact resume
from checkpoints, slow-weight evaluation, frozen parameters, `reset_state`, and state-dict checks."""
import copy, io, pytest, torch
from torch import nn
import fastai.optimizer as fai
import fastopt
from fastopt import Lookahead, ranger, SGD, Adam, RAdam
from helpers import SHAPES, make_groups, gradient_stream, run, train_then_freeze, plain_torch_run

N_STEPS = 200
K_ALPHA = [(1, 1.0), (5, 0.5), (6, 0.8), (3, 0.3)]
INNER = {
    'SGD-mom': (lambda m, ps: m.SGD(ps, lr=slice(1e-3, 1e-2), mom=0.9, wd=1e-2)),
    'Adam':    (lambda m, ps: m.Adam(ps, lr=slice(1e-3, 1e-2))),
}

def _close(xs, ys):
    for a, b in zip(xs, ys): torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

@pytest.mark.parametrize('inner', list(INNER))
@pytest.mark.parametrize('k,alpha', K_ALPHA)
def test_lookahead_matches_fastai(inner, k, alpha):
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, N_STEPS)
    _close(run(Lookahead(INNER[inner](fastopt, ours), k=k, alpha=alpha), ours, grads),
           run(fai.Lookahead(INNER[inner](fai, theirs), k=k, alpha=alpha), theirs, grads))

@pytest.mark.parametrize('k,alpha', K_ALPHA)
def test_ranger_matches_fastai(k, alpha):
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, N_STEPS)
    opt, ref = ranger(ours, lr=slice(1e-3, 1e-2), k=k, alpha=alpha), fai.ranger(theirs, lr=slice(1e-3, 1e-2), k=k, alpha=alpha)
    assert [dict(h) for h in opt.hypers] == [dict(h) for h in ref.hypers]
    _close(run(opt, ours, grads), run(ref, theirs, grads))

def test_ranger_signature_matches_fastai():
    import inspect
    ours, theirs = inspect.signature(ranger), inspect.signature(fai.ranger)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [(p.name, p.default) for p in theirs.parameters.values()]

@pytest.mark.parametrize('k', [1, 2, 5, 7])
def test_alpha_one_reproduces_inner(k):
    a, b = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(a, 30)
    for x, y in zip(run(Lookahead(Adam(a, lr=1e-2), k=k, alpha=1.0), a, grads), run(Adam(b, lr=1e-2), b, grads)):
        assert torch.equal(x, y)

@pytest.mark.parametrize('k', [2, 3, 6])
def test_closed_form_on_quadratic(k):
    "f(w) = w²/2 with SGD: each sync multiplies the slow weights by 1 - α + α(1-lr)^k"
    lr, alpha, syncs = 0.1, 0.3, 5
    w = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    opt = Lookahead(SGD([w], lr=lr), k=k, alpha=alpha)
    for _ in range(syncs*k):
        opt.zero_grad(); (0.5*w.pow(2)).sum().backward(); opt.step()
    expected = torch.tensor([1.5, -2.0], dtype=torch.float64) * (1 - alpha + alpha*(1-lr)**k)**syncs
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=0)

def _model(): torch.manual_seed(0); return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]
def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(); nn.functional.mse_loss(model(x), y).backward(); opt.step()

@pytest.mark.parametrize('make_opt', [
    lambda m: ranger([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2, k=5),
    lambda m: Lookahead(SGD(m.parameters(), lr=0.05, mom=0.9), k=4, alpha=0.6),
    lambda m: Lookahead(Adam(m.parameters(), lr=1e-2), k=3, reset_state=True),
], ids=['ranger', 'lookahead-sgd', 'lookahead-adam-reset'])
def test_checkpoint_resume_is_bit_exact(make_opt, tmp_path):
    N, M = 7, 9                       # k does not divide N: the checkpoint falls mid-cycle
    batches = _batches(N + M)
    ref = _model(); ref_opt = make_opt(ref); _train(ref, ref_opt, batches)

    model = _model(); opt = make_opt(model); _train(model, opt, batches[:N])
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, tmp_path/'ckpt.pth')
    ckpt = torch.load(tmp_path/'ckpt.pth', weights_only=True)
    model2 = _model(); model2.load_state_dict(ckpt['model'])
    opt2 = make_opt(model2); opt2.load_state_dict(ckpt['opt'])
    _train(model2, opt2, batches[N:])
    for a, b in zip(model2.parameters(), ref.parameters()): assert torch.equal(a, b)

def test_load_state_dict_does_not_mutate_input():
    model = _model(); opt = ranger(model.parameters(), lr=1e-2, k=4); _train(model, opt, _batches(6))
    sd = opt.state_dict(); keys = set(sd)
    fresh = ranger(_model().parameters(), lr=1e-2, k=4); fresh.load_state_dict(sd)
    assert set(sd) == keys and sd['count'] == 6
    fresh.slow_weights[0][0].add_(1.)
    assert not torch.equal(sd['slow_weights'][0][0], fresh.slow_weights[0][0])

def test_load_state_dict_mismatch_changes_nothing():
    model = _model(); opt = ranger(model.parameters(), lr=1e-2, k=4); _train(model, opt, _batches(6))
    sd = opt.state_dict()
    sd['slow_weights'][0][1] = torch.zeros(5)
    fresh_model = _model(); fresh = ranger(fresh_model.parameters(), lr=1e-2, k=4); _train(fresh_model, fresh, _batches(2))
    before = (fresh.count, [s.clone() for s in fresh.slow_weights[0]], copy.deepcopy(fresh.opt.state_dict()))
    with pytest.raises(ValueError, match=r'slow weight 1 of group 0 is \(5,\)'): fresh.load_state_dict(sd)
    assert fresh.count == before[0]
    for a, b in zip(fresh.slow_weights[0], before[1]): assert torch.equal(a, b)
    assert fresh.opt.state_dict()['state'][0]['step'] == before[2]['state'][0]['step']
    with pytest.raises(ValueError, match='not saved by a Lookahead'): fresh.load_state_dict(fresh.opt.state_dict())

def test_frozen_and_gradless_parameters_never_drift():
    groups = make_groups([[(3,), (2,)], [(4,)]])
    frozen, no_grad, trained = groups[0][0], groups[0][1], groups[1][0]
    start = [p.clone() for p in (frozen, no_grad)]
    opt = Lookahead(Adam(groups, lr=0.1), k=3)
    for _ in range(20):
        trained.grad = torch.randn(4)          # the others never get a gradient
        opt.step()
    assert torch.equal(frozen, start[0]) and torch.equal(no_grad, start[1])
    assert torch.equal(opt.slow_weights[0][0], start[0])
    assert not torch.equal(trained, groups[1][0].new_zeros(4))

def test_slow_weights_on_parameter_dtype():
    w = torch.randn(3, dtype=torch.float64); w.grad = torch.randn(3, dtype=torch.float64)
    opt = Lookahead(SGD([w], lr=0.1)); opt.step()
    assert opt.slow_weights[0][0].dtype == torch.float64 and opt.slow_weights[0][0].device == w.device

def test_reset_state_equals_rebuilding_inner_each_sync():
    k = 4
    a, b = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(a, 3*k)
    run(Lookahead(Adam(a, lr=1e-2), k=k, reset_state=True), a, grads)
    flat = [p for g in b for p in g]
    for cycle in range(3):                      # a fresh Adam and a fresh Lookahead per cycle of k steps
        run(Lookahead(Adam(b, lr=1e-2), k=k), b, grads[cycle*k:(cycle+1)*k])
    for x, y in zip([p for g in a for p in g], flat): assert torch.equal(x, y)

def test_evaluation_on_slow_weights_does_not_change_training():
    batches = _batches(10)
    ref = _model(); ref_opt = ranger(ref.parameters(), lr=1e-2, k=4); _train(ref, ref_opt, batches)
    model = _model(); opt = ranger(model.parameters(), lr=1e-2, k=4)
    for i, batch in enumerate(batches):
        _train(model, opt, [batch])
        fast = [p.clone() for p in model.parameters()]
        with opt.slow_weights_loaded():
            for p, s in zip(model.parameters(), opt.slow_weights[0]): assert torch.equal(p, s)
            with opt.slow_weights_loaded(): pass    # nested: the outer block still holds the slow weights
            for p, s in zip(model.parameters(), opt.slow_weights[0]): assert torch.equal(p, s)
            with pytest.raises(RuntimeError, match='restore_fast_weights'): opt.step()
        for p, f in zip(model.parameters(), fast): assert torch.equal(p, f)
        opt.restore_fast_weights()                 # without a load: does nothing
        opt.load_slow_weights(); opt.load_slow_weights(); opt.restore_fast_weights()
    for a, b in zip(model.parameters(), ref.parameters()): assert torch.equal(a, b)

def test_hypers_and_freezing_reach_inner():
    groups = make_groups([[(3,)], [(2,)]])
    opt = ranger(groups, lr=1e-3)
    opt.set_hyper('lr', slice(1e-4, 1e-2))
    assert [h['lr'] for h in opt.opt.hypers] == pytest.approx([1e-4, 1e-2])
    opt.param_groups[0]['mom'] = 0.9             # as a torch scheduler writes it
    assert opt.hypers[0]['mom'] == 0.9 and opt.opt.param_groups[0]['mom'] == 0.9
    opt.freeze()
    assert [p.requires_grad for g in groups for p in g] == [False, True]
    opt.unfreeze()
    assert opt.param_lists == opt.opt.param_lists and isinstance(opt, torch.optim.Optimizer)

def test_clear_state_clears_inner_and_slow_weights():
    w = torch.ones(3); w.grad = torch.ones(3)
    opt = ranger([w], lr=1e-2); opt.state[w]['force_train'] = True
    opt.step(); opt.clear_state()
    assert opt.slow_weights is None and opt.count == 0 and opt.state[w] == {'force_train': True}

@pytest.mark.parametrize('kw,msg', [(dict(k=0), 'k must be an integer >= 1'), (dict(k=2.0), 'got 2.0'),
                                     (dict(k=True), 'got True'), (dict(alpha=0.), r'alpha must be a number in \(0, 1\]'),
                                     (dict(alpha=1.01), 'got 1.01'), (dict(alpha=float('nan')), 'got nan')])
def test_bad_k_alpha(kw, msg):
    with pytest.raises(ValueError, match=msg): Lookahead(SGD([torch.ones(1)], lr=0.1), **kw)
    with pytest.raises(ValueError, match=msg): ranger([torch.ones(1)], lr=0.1, **kw)

def test_wrapping_a_non_optimizer():
    with pytest.raises(TypeError, match='wraps a torch.optim.Optimizer'): Lookahead([torch.ones(1)])

def test_wraps_a_torch_optimizer():
    "Any torch.optim.Optimizer can be the inner optimizer: torch SGD with momentum is fastopt's SGD with L2"
    a, b = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(a, 40)
    theirs = Lookahead(torch.optim.SGD([{'params': g} for g in a], lr=1e-2, momentum=0.9, weight_decay=1e-2), k=5,
                       reset_state=True)
    ours = Lookahead(SGD(b, lr=1e-2, mom=0.9, wd=1e-2, decouple_wd=False), k=5, reset_state=True)
    _close(run(theirs, a, grads), run(ours, b, grads))
    sd = theirs.state_dict()
    assert sd['count'] == 40 and len(sd['slow_weights']) == 2
    theirs.clear_state()
    assert len(theirs.state) == 0 and theirs.slow_weights is None

def test_deepcopy_and_pickle():
    import pickle
    model = _model(); opt = ranger(model.parameters(), lr=1e-2, k=4); _train(model, opt, _batches(5))
    model2, opt2 = copy.deepcopy((model, opt))
    _train(model, opt, _batches(3)); _train(model2, opt2, _batches(3))
    for x, y in zip(model.parameters(), model2.parameters()): assert torch.equal(x, y)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.count == opt.count and restored.k == 4 and restored.hypers == opt.hypers

@pytest.mark.parametrize('k,alpha', [(5, 0.5), (3, 0.8)])
def test_lookahead_over_optim_wrapper_matches_fastai(k, alpha):
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, 60)
    opt = Lookahead(fastopt.OptimWrapper(ours, torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), k=k, alpha=alpha)
    ref = fai.Lookahead(fai.OptimWrapper(theirs, torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), k=k, alpha=alpha)
    assert opt.hypers == ref.hypers and 'mom' in opt.hypers[0]
    # fastai's Lookahead.set_hyper is a no-op over an OptimWrapper (see the test below): set its inner one
    opt.set_hyper('lr', slice(1e-3, 1e-2)); ref.opt.set_hyper('lr', slice(1e-3, 1e-2))
    opt.set_hyper('mom', 0.85); ref.opt.set_hyper('mom', 0.85)
    assert opt.opt.opt.param_groups[0]['betas'] == (0.85, 0.99)
    _close(run(opt, ours, grads), run(ref, theirs, grads))

def test_fix_set_hyper_reaches_optim_wrapper_under_lookahead():
    "fastai's Lookahead writes into `hypers`, which an OptimWrapper returns as fresh copies: the value is lost"
    ref = fai.Lookahead(fai.OptimWrapper([torch.zeros(2)], torch.optim.AdamW, lr=1e-2))
    ref.set_hyper('lr', 0.5)
    assert ref.opt.opt.param_groups[0]['lr'] == 1e-2          # fastai: silently unchanged
    opt = Lookahead(fastopt.OptimWrapper([torch.zeros(2)], torch.optim.AdamW, lr=1e-2))
    opt.set_hyper('lr', 0.5)
    assert opt.opt.opt.param_groups[0]['lr'] == 0.5 and opt.hypers[0]['lr'] == 0.5

# ---- frozen parameters under a Lookahead over a torch optimizer ----

FROZEN_SHAPES = [[(5, 4), (4,)], [(3,), (2, 2)]]
TORCH_INNER = {
    'torch-AdamW': lambda groups: torch.optim.AdamW([{'params': g} for g in groups], lr=1e-2, weight_decay=0.1),
    'OptimWrapper-AdamW': lambda groups: fastopt.OptimWrapper(groups, torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
}

def _torch_state(opt):
    inner = opt.opt.opt if isinstance(opt.opt, fastopt.OptimWrapper) else opt.opt
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in inner.state.items()}

@pytest.mark.parametrize('k,alpha', [(3, 0.5), (2, 1.0)])
@pytest.mark.parametrize('inner', list(TORCH_INNER))
def test_frozen_parameters_never_move_over_torch_optimizer(inner, k, alpha):
    ours, ref = make_groups(FROZEN_SHAPES), make_groups(FROZEN_SHAPES)
    grads = gradient_stream(ours, 10)
    opt = Lookahead(TORCH_INNER[inner](ours), k=k, alpha=alpha)
    run(opt, ours, grads[:4])                       # a mid-cycle freeze for k=3, with AdamW state for every param
    frozen, state = [p.clone() for p in ours[0]], _torch_state(opt)
    train_then_freeze(opt, ours, grads[4:])
    for p, f in zip(ours[0], frozen): assert torch.equal(p, f)        # no decay, no momentum, no sync drift
    after = _torch_state(opt)
    for p in ours[0]:                                                # their state is untouched
        assert all(torch.equal(after[id(p)][n], v) for n, v in state[id(p)].items())
    for p in ours[0]: assert p.grad is not None and not p.grad.any()
    # the trained group moves as over an inner optimizer that never saw the frozen parameters' gradients (at
    # alpha = 1 that is a plain torch AdamW); unfrozen, the first group would be synchronised, frozen it is not
    ref_opt = TORCH_INNER['torch-AdamW'](ref)
    if alpha != 1.0: ref_opt = Lookahead(ref_opt, k=k, alpha=alpha)
    plain_torch_run(ref_opt, ref, grads, 4)
    for a, b in zip(ref[1], ours[1]): assert torch.equal(a, b)

# ---- state-dict hooks registered on the Lookahead run, as torch runs them ----

@pytest.mark.parametrize('inner', ['fastopt-Adam', 'torch-AdamW'])
def test_state_dict_hooks_run(inner):
    make = ((lambda m: Adam(m.parameters(), lr=1e-2)) if inner == 'fastopt-Adam' else
            (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)))
    model = _model(); opt = Lookahead(make(model), k=2); _train(model, opt, _batches(3))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(('pre', o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, 'extra': 1})
    sd = opt.state_dict()
    assert calls == [('pre', opt)] and sd['extra'] == 1 and sd['count'] == 3
    fresh = Lookahead(make(_model()), k=2)
    seen = []
    def load_pre(o, sd):
        seen.append(o); sd = {k: v for k, v in sd.items() if k != 'extra'}
        return {**sd, 'count': 5}
    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(('post', o.count)))
    fresh.load_state_dict(sd)
    assert seen == [fresh, ('post', 5)] and fresh.count == 5
    assert sd['extra'] == 1 and sd['count'] == 3                       # the caller's dict is unchanged
    for a, b in zip(fresh.slow_weights[0], opt.slow_weights[0]): assert torch.equal(a, b)

def test_hooks_survive_pickling():
    import pickle
    opt = Lookahead(Adam([torch.zeros(2)], lr=1e-2))
    restored = pickle.loads(pickle.dumps(opt))       # hooks are not pickled: the copy has none, and works
    assert 'slow_weights' in restored.state_dict()

def test_repr_shows_settings_and_inner_optimizer():
    inner = Adam([torch.zeros(2)], lr=1e-2)
    r = repr(Lookahead(inner, k=4, alpha=0.3))
    assert r.startswith('Lookahead(k=4, alpha=0.3, ') and repr(inner) in r and 'reset_state' not in r
    assert 'reset_state=True' in repr(Lookahead(inner, reset_state=True))
    assert repr(ranger([torch.zeros(2)], lr=1e-3)).startswith('Lookahead(k=6, alpha=0.5, ')
    wrapped = fastopt.OptimWrapper([torch.zeros(2)], torch.optim.AdamW, lr=1e-2)
    assert repr(wrapped) in repr(Lookahead(wrapped)) and 'AdamW' in repr(Lookahead(wrapped))
