"OptimWrapper against fastai's: same hypers and set_hyper semantics, same training; plus torch-loop compatibility."
import io, pytest, torch
from torch import nn
import fastai.optimizer as fai
from fastopt import OptimWrapper, Lookahead
from helpers import SHAPES, make_groups, gradient_stream, run

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
