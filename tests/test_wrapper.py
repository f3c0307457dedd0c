"OptimWrapper against fastai's: same hypers and set_hyper semantics, same training; plus torch-loop compatibility."
import io, pytest, torch
from torch import nn
import fastai.optimizer as fai
from fastopt import OptimWrapper, Lookahead
from helpers import SHAPES, make_groups, gradient_stream, run, train_then_freeze, plain_torch_run

CTORS = [(torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
         (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99))),
         (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9))]

@pytest.mark.parametrize('ctor,kw', CTORS, ids=[c.__name__ for c, _ in CTORS])
def test_matches_fastai_wrapper(ctor, kw):
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    opt, ref = OptimWrapper(ours, ctor, **kw), fai.OptimWrapper(theirs, ctor, **kw)
    assert opt.hypers == ref.hypers
    for k in ('lr', 'mom', 'sqr_mom', 'wd'):
        if k in ref.hypers[0]:
            opt.set_hyper(k, [0.5*ref.hypers[0][k], ref.hypers[1][k]]); ref.set_hyper(k, [0.5*ref.hypers[0][k], ref.hypers[1][k]])
    assert opt.hypers == ref.hypers
    grads = gradient_stream(ours, 30)
    for a, b in zip(run(opt, ours, grads), run(ref, theirs, grads)): assert torch.equal(a, b)

def test_errors():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match='both `params` and a built optimizer'): OptimWrapper([w], torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ValueError, match='needs `opt`'): OptimWrapper([w])
    with pytest.raises(ValueError, match='no `params`'): OptimWrapper(opt=torch.optim.SGD)
    with pytest.raises(TypeError, match="must be a torch optimizer"): OptimWrapper([w], opt=3)
    opt = OptimWrapper([[w], [torch.zeros(1)]], torch.optim.AdamW, lr=1e-3)
    before = [dict(pg) for pg in opt.param_groups]
    with pytest.raises(ValueError, match="unknown hyper-parameter 'momentum'"): opt.set_hyper('momentum', 0.9)
    with pytest.raises(ValueError, match="got 3 values for 2"): opt.set_hypers(lr=1e-2, mom=[0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="invalid 'sqr_mom'"): opt.set_hypers(lr=1e-2, sqr_mom=1.2)
    assert [dict(pg) for pg in opt.param_groups] == before

def test_torch_loop_compatibility():
    torch.manual_seed(0); model = nn.Linear(3, 2)
    opt = OptimWrapper(model.parameters(), torch.optim.AdamW, lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=5)
    calls = []; opt.register_step_post_hook(lambda *a: calls.append(1))
    for _ in range(3):
        opt.zero_grad(); model(torch.randn(4, 3)).sum().backward(); opt.step(); s.step()
    assert len(calls) == 3 and opt.hypers[0]['lr'] == opt.opt.param_groups[0]['lr']
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    opt2 = OptimWrapper(model.parameters(), torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.opt.state_dict()['state'][0]['step'] == 3

def test_freeze_and_force_train_flags():
    groups = make_groups([[(2,)], [(3,), (1,)]])
    opt = OptimWrapper(groups, torch.optim.SGD, lr=0.1)
    opt.state[groups[0][0]]['force_train'] = True
    with pytest.warns(UserWarning, match='whole model is frozen'): opt.freeze_to(2)   # force_train stays trainable
    assert [p.requires_grad for g in groups for p in g] == [True, False, False]
    opt.clear_state()
    assert opt.state[groups[0][0]] == {'force_train': True} and len(opt.opt.state) == 0

# ---- frozen parameters: a wrapped torch optimizer never moves them ----

FROZEN_SHAPES = [[(5, 4), (4,)], [(3,), (2, 2)]]

def torch_state(opt, ps):
    "Copies of the torch optimizer's state of `ps`"
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]

def assert_same_state(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

def test_frozen_parameters_never_move_under_wrapped_adamw():
    ours, ref = make_groups(FROZEN_SHAPES), make_groups(FROZEN_SHAPES)
    grads = gradient_stream(ours, 8)
    opt = OptimWrapper(ours, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    torch_opt = torch.optim.AdamW([{'params': g} for g in ref], lr=1e-2, weight_decay=0.1)
    run(opt, ours, grads[:3])
    frozen, state = [p.clone() for p in ours[0]], torch_state(opt.opt, ours[0])
    train_then_freeze(opt, ours, grads[3:])
    for p, f in zip(ours[0], frozen): assert torch.equal(p, f)                     # no decay, no momentum
    assert_same_state(torch_state(opt.opt, ours[0]), state)                          # state untouched
    for p in ours[0]: assert p.grad is not None and not p.grad.any()                 # their zeroed grads are back
    # the trained group moves exactly as a plain AdamW moves it when the frozen parameters have no gradient
    for a, b in zip(plain_torch_run(torch_opt, ref, grads, 3), [p for g in ours for p in g]): assert torch.equal(a, b)

def test_frozen_gradients_come_back_when_the_torch_step_raises():
    class Failing(torch.optim.SGD):
        def step(self, closure=None): raise RuntimeError("boom")
    groups = make_groups([[(3,)], [(2,)]])
    opt = OptimWrapper(opt=Failing([{'params': g} for g in groups], lr=0.1))
    opt.freeze()
    grads = [torch.ones(3), torch.ones(2)]
    for p, g in zip([groups[0][0], groups[1][0]], grads): p.grad = g
    with pytest.raises(RuntimeError, match='boom'): opt.step()
    assert groups[0][0].grad is grads[0] and groups[1][0].grad is grads[1]

def test_closure_passes_through_with_frozen_parameters():
    "The torch optimizer still gets the closure (LBFGS calls it itself, several times)"
    torch.manual_seed(0); model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = OptimWrapper([list(model[0].parameters()), list(model[1].parameters())], torch.optim.SGD, lr=0.1,
                       momentum=0.9, weight_decay=0.1)
    opt.freeze()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    frozen = [p.clone() for p in model[0].parameters()]
    def closure():
        opt.zero_grad(); loss = nn.functional.mse_loss(model(x), y); loss.backward(); return loss
    trained = [p.clone() for p in model[1].parameters()]
    for _ in range(3): loss = opt.step(closure)
    assert loss is not None and not torch.equal(model[1].weight, trained[0])
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), frozen))

# ---- state-dict hooks registered on the wrapper run, as torch runs them ----

def test_state_dict_hooks_run():
    torch.manual_seed(0); model = nn.Linear(3, 2)
    opt = OptimWrapper(model.parameters(), torch.optim.AdamW, lr=1e-2)
    model(torch.randn(4, 3)).sum().backward(); opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(('pre', o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, 'extra': 1})
    sd = opt.state_dict()
    assert calls == [('pre', opt)] and sd['extra'] == 1
    opt2 = OptimWrapper(model.parameters(), torch.optim.AdamW, lr=1e-2)
    seen = []
    def load_pre(o, sd):
        seen.append(o); sd = {k: v for k, v in sd.items() if k != 'extra'}
        sd['param_groups'] = [{**g, 'lr': 0.5} for g in sd['param_groups']]
        return sd
    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(('post', o.hypers[0]['lr'])))
    opt2.load_state_dict(sd)
    assert seen == [opt2, ('post', 0.5)] and opt2.opt.state_dict()['state'][0]['step'] == 1
    assert sd['extra'] == 1 and sd['param_groups'][0]['lr'] == 1e-2        # the caller's dict is unchanged

def test_repr_names_the_wrapper_and_the_torch_optimizer():
    opt = OptimWrapper([torch.zeros(2)], torch.optim.AdamW, lr=1e-2)
    r = repr(opt)
    assert r.startswith('OptimWrapper(') and repr(opt.opt) in r and 'AdamW' in r and 'lr: 0.01' in r
