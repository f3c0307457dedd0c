"""fastopt optimizers as `opt_func` of a real fastai 2.8 Learner (fastai.basics only, never fastai.vision):
fit, fit_one_cycle, fit_flat_cos, lr_find, fine_tune with a splitter and a slice, wd_bn_bias, train_bn,
save/load with the optimizer state, and export. The strongest check: the same per-batch losses as fastai's
own optimizers through fit_one_cycle."""
import math, warnings
import pytest, torch
from torch import nn
from functools import partial
from fastai.basics import (Learner, Callback, DataLoaders, params, MSELossFlat, CrossEntropyLossFlat, load_learner,
                           accuracy)
import fastai.callback.schedule  # fit_one_cycle, fit_flat_cos, lr_find, fine_tune
import fastai.optimizer as fai
import fastopt

class LossRecorder(Callback):
    "Per-batch training losses"
    order = 100
    def before_fit(self): self.losses = []
    def after_batch(self):
        if self.training: self.losses.append(self.loss.item())

class Items(list):
    "A list dataset that `Learner.export` can empty (it calls `new_empty`)"
    def new_empty(self): return type(self)()

def _dls(x, y, n_valid, bs):
    ds = list(zip(x, y))
    return DataLoaders.from_dsets(Items(ds[n_valid:]), Items(ds[:n_valid]), bs=bs, shuffle=False, device='cpu')

def synth_dls(n=160, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g); y = x @ torch.tensor([[1.], [-2.], [0.5], [3.]]) + 0.1*torch.randn(n, 1, generator=g)
    return _dls(x, y, 32, bs)

def digits_dls(bs=64):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)/16.; y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return _dls(x[idx], y[idx], 360, bs)

def mlp(n_in, n_out):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(n_in, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, n_out))

def two_groups(m): return [params(m[:3]), params(m[3])]

DATA = {'synth': lambda: (synth_dls(), mlp(4, 1), MSELossFlat()),
        'digits': lambda: (digits_dls(), mlp(64, 10), CrossEntropyLossFlat())}

def learner(opt_func, dls=None, model=None, data='synth', **kw):
    d_dls, d_model, d_loss = DATA[data]()
    return Learner(dls or d_dls, model or d_model, loss_func=kw.pop('loss_func', d_loss), opt_func=opt_func,
                   cbs=LossRecorder(), **kw)

def fit(learn, method, *args, **kw):
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **kw)
    return learn.loss_recorder.losses

FASTOPT = {
    'SGD': partial(fastopt.SGD, mom=0.9), 'RMSProp': fastopt.RMSProp, 'Adam': fastopt.Adam, 'RAdam': fastopt.RAdam,
    'QHAdam': fastopt.QHAdam, 'Larc': fastopt.Larc, 'Lamb': fastopt.Lamb, 'ranger': fastopt.ranger,
    'OptimWrapper-AdamW': partial(fastopt.OptimWrapper, opt=torch.optim.AdamW),
}

@pytest.mark.parametrize('name', ['ranger', 'Adam', 'SGD', 'RAdam', 'Lamb'])
def test_fit_one_cycle_losses_match_fastai(name):
    # fastai's SGD built with mom=0 ignores the momentum fit_one_cycle schedules; fastopt's applies it (as torch
    # does; test_fix_momentum_set_after_construction_takes_effect), which fastai's SGD with momentum matches
    ref = partial(fai.SGD, mom=0.9) if name == 'SGD' else getattr(fai, name)
    torch.manual_seed(42); theirs = fit(learner(ref), 'fit_one_cycle', 3, 1e-2)
    torch.manual_seed(42); ours = fit(learner(getattr(fastopt, name)), 'fit_one_cycle', 3, 1e-2)
    assert len(ours) == 24
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)

@pytest.mark.parametrize('name', list(FASTOPT))
@pytest.mark.parametrize('method,args', [('fit', (2, 1e-2)), ('fit_one_cycle', (2, 1e-2)), ('fit_flat_cos', (2, 1e-2))])
def test_every_optimizer_trains_in_a_learner(name, method, args):
    learn = learner(FASTOPT[name])
    losses = fit(learn, method, *args)
    assert len(losses) == 16 and all(math.isfinite(l) for l in losses)
    assert isinstance(learn.opt, torch.optim.Optimizer)
    if method == 'fit_one_cycle':   # the schedule reached the optimizer: annealed far below lr_max by the end
        assert learn.opt.hypers[-1]['lr'] < 1e-2/20

def test_one_cycle_schedules_lr_and_mom_of_ranger_like_fastai():
    recs = {}
    for mod in (fai, fastopt):
        class HyperRecorder(Callback):
            def before_fit(self): self.seen = []
            def before_batch(self): self.seen.append((self.opt.hypers[0]['lr'], self.opt.hypers[0]['mom']))
        torch.manual_seed(42); learn = learner(mod.ranger); learn.add_cb(HyperRecorder())
        fit(learn, 'fit_one_cycle', 2, 1e-2); recs[mod.__name__] = learn.hyper_recorder.seen
    flat = {k: [float(x) for pair in v for x in pair] for k, v in recs.items()}   # 2 epochs of 8 train + 2 valid batches
    assert len(flat['fastopt']) == 2*20 and flat['fastopt'] == pytest.approx(flat['fastai.optimizer'], rel=1e-12)

@pytest.mark.parametrize('data', list(DATA))
def test_lr_find_runs_and_restores(data):
    learn = learner(fastopt.ranger, data=data)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); res = learn.lr_find(num_it=20, show_plot=False)
    assert res.valley > 0
    for a, b in zip(learn.model.parameters(), before): assert torch.equal(a, b)   # lr_find restores the weights

@pytest.mark.parametrize('data', list(DATA))
def test_fine_tune_with_splitter_and_slice(data):
    learn = learner(fastopt.Adam, data=data, splitter=two_groups)
    frozen_seen = []
    class FrozenRecorder(Callback):
        def before_epoch(self): frozen_seen.append([p.requires_grad for p in self.model[0].parameters()])
    learn.add_cb(FrozenRecorder())
    fit(learn, 'fine_tune', 1, base_lr=1e-2, freeze_epochs=1)
    assert frozen_seen == [[False, False], [True, True]]     # frozen body, then unfrozen
    assert len(learn.opt.param_groups) == 2
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1]                                    # discriminative rates from the slice

@pytest.mark.parametrize('data', list(DATA))
def test_wd_bn_bias_false_sets_do_wd_and_train_bn_sets_force_train(data):
    learn = learner(partial(fastopt.Adam, wd=0.1), data=data, splitter=two_groups, wd_bn_bias=False, train_bn=True)
    learn.create_opt()
    m = learn.model
    norm_and_bias = [m[1].weight, m[1].bias, m[0].bias, m[3].bias]
    for p in norm_and_bias: assert learn.opt.state[p]['do_wd'] is False
    assert learn.opt.state[m[1].weight]['force_train'] is True
    learn.freeze()
    assert m[1].weight.requires_grad and not m[0].weight.requires_grad   # batch norm keeps training when frozen
    # with a zero gradient only weight decay could move a parameter: the exempt bias stays put
    learn.unfreeze()
    bias = m[3].bias.detach().clone()
    m[3].bias.grad = torch.zeros_like(bias); m[3].weight.grad = torch.zeros_like(m[3].weight)
    for p in m[:3].parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    assert torch.equal(m[3].bias, bias)

@pytest.mark.parametrize('data', list(DATA))
def test_save_load_with_optimizer_state(tmp_path, data):
    learn = learner(fastopt.ranger, data=data, path=tmp_path)
    fit(learn, 'fit_one_cycle', 1, 1e-2)
    learn.save('ckpt')
    learn2 = learner(fastopt.ranger, data=data, path=tmp_path)
    learn2.load('ckpt')
    assert learn2.opt.count == learn.opt.count
    for a, b in zip(learn2.opt.slow_weights[0], learn.opt.slow_weights[0]): assert torch.equal(a, b)
    sa, sb = learn.opt.state_dict()['state'], learn2.opt.state_dict()['state']
    for i in sa:
        for k, v in sa[i].items(): assert torch.equal(sb[i][k], v) if isinstance(v, torch.Tensor) else sb[i][k] == v

@pytest.mark.parametrize('data', list(DATA))
def test_export_pickles_and_loads(tmp_path, data):
    learn = learner(fastopt.ranger, data=data, path=tmp_path)
    fit(learn, 'fit', 1, 1e-2)
    learn.export('export.pkl')
    with pytest.warns(UserWarning, match='insecure pickle'): loaded = load_learner(tmp_path/'export.pkl')
    x = torch.randn(5, 4 if data == 'synth' else 64)
    learn.model.eval(); loaded.model.eval()
    assert torch.equal(loaded.model(x), learn.model(x))

@pytest.mark.parametrize('name,lr', [('SGD', 0.1), ('Adam', 1e-2), ('RAdam', 1e-2), ('ranger', 3e-2), ('Lamb', 3e-2)])
def test_digits_reaches_high_accuracy(name, lr):
    dls = digits_dls()
    learn = Learner(dls, mlp(64, 10), loss_func=CrossEntropyLossFlat(), opt_func=FASTOPT[name], metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(5, lr)
        acc = learn.validate()[1]
    assert acc > 0.9, f'{name}: {acc}'
