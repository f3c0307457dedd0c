"""The modern optimizers of `fastopt.modern` as `opt_func` of a fastai 2.8 Learner on scikit-learn's digits
(fastai.basics only): fit_one_cycle reaches a validation accuracy above 90%, lr_find runs and restores the weights,
and a checkpoint saved with the optimizer (`learn.save(with_opt=True)`) loaded into a new Learner continues
exactly as the uninterrupted run does, bit for bit. Schedule-Free AdamW runs with its callback `ScheduleFreeEval`
(validation at the average x); Muon with AdamW for the rest, through `muon_groups` as the splitter."""
import math, warnings
from functools import partial
import pytest, torch
from torch import nn
from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat, accuracy
import fastai.callback.schedule  # fit_one_cycle, lr_find
import fastopt.modern
from fastopt.modern import *

class Items(list):
    "A list dataset that fastai can empty"
    def new_empty(self): return type(self)()

def digits_dls(bs=64):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)/16.; y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    ds = list(zip(x[idx], y[idx]))
    # no shuffling: a resumed run sees the batches in the uninterrupted run's order
    return DataLoaders.from_dsets(Items(ds[360:]), Items(ds[:360]), bs=bs, shuffle=False, device='cpu',
                                  num_workers=0)

DLS = digits_dls()

def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

# name: (opt_func, learner keyword arguments, lr_max of fit_one_cycle)
OPTIMIZERS = {
    'Lion':              (partial(Lion, wd=0.1), {}, 5e-3),
    'Adan':              (Adan, {}, 3e-2),
    'ADOPT':             (ADOPT, {}, 1e-2),
    'AdEMAMix':          (AdEMAMix, {}, 1e-2),
    'StableAdamW':       (StableAdamW, {}, 1e-2),
    'ScheduleFreeAdamW': (ScheduleFreeAdamW, dict(cbs=lambda: [fastopt.modern.ScheduleFreeEval()]), 1e-2),
    'Adafactor':         (Adafactor, {}, 5e-2),
    'MuonAdamW':         (MuonAdamW, dict(splitter=muon_groups), 1e-2),
}

def learner(name, path=None):
    opt_func, kw, _ = OPTIMIZERS[name]
    kw = {k: v() if callable(v) and k == 'cbs' else v for k, v in kw.items()}
    return Learner(DLS, mlp(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy,
                   **({} if path is None else dict(path=path)), **kw)

@pytest.fixture(autouse=True)
def one_thread():
    "A small model trains fastest in one thread, and a busy machine's thread pool only slows it"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_fit_one_cycle_learns_digits(name):
    learn = learner(name)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, OPTIMIZERS[name][2])
    with learn.no_bar(), learn.no_logging(): loss, acc = learn.validate()
    assert acc > 0.9, f"{name}: validation accuracy {acc:.3f}"
    if name == 'MuonAdamW':   # the hidden matrix trained with Muon, the rest with AdamW
        assert [g['use_muon'] for g in learn.opt.param_groups] == [True, False]
        assert 'grad_avg' in learn.opt.state[learn.model[0].weight] and 'sqr_avg' not in learn.opt.state[learn.model[0].weight]
    if name == 'ScheduleFreeAdamW': assert learn.opt.training is False   # the model holds x after fitting

@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_lr_find_runs_and_restores(name):
    learn = learner(name)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); res = learn.lr_find(num_it=20, show_plot=False)
    assert res.valley > 0 and math.isfinite(res.valley)
    for a, b in zip(learn.model.parameters(), before): assert torch.equal(a, b)

@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_save_load_with_optimizer_resumes_bit_exactly(name, tmp_path):
    """fit, save with the optimizer, fit on; a new Learner loads the checkpoint and fits on: the same weights, bit for
    bit. Adafactor's needs `Optimizer.load_state_dict` to accept state shaped as its callbacks' `state_shapes` say."""
    lr = OPTIMIZERS[name][2]/3
    whole = learner(name, tmp_path)
    with whole.no_bar(), whole.no_logging(): whole.fit(1, lr)
    whole.save('ckpt', with_opt=True)
    with whole.no_bar(), whole.no_logging(): whole.fit(1, lr)
    resumed = learner(name, tmp_path)
    with warnings.catch_warnings():   # fastai turns a failed optimizer load into a warning: fail here, on its cause
        warnings.filterwarnings('error', message='Could not load the optimizer state')
        resumed.load('ckpt', with_opt=True)
    with resumed.no_bar(), resumed.no_logging(): resumed.fit(1, lr)
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resuming"

def _demo_module():
    import importlib.util, pathlib
    path = pathlib.Path(__file__).resolve().parent.parent/'examples'/'train_digits.py'
    spec = importlib.util.spec_from_file_location('train_digits', path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def test_demo_runs_modern_optimizers_by_name(tmp_path, capsys):
    demo = _demo_module()
    assert demo.parse_args(['--opt', 'Lion', '--opt', 'adan,ScheduleFreeAdamW', '--opt', 'MuonAdamW']).opt == \
           ['Lion', 'Adan', 'ScheduleFreeAdamW', 'Muon']
    assert {'Lion', 'Adan', 'ScheduleFreeAdamW', 'Muon'} <= set(demo.parse_args([]).opt)   # in the default table
    assert set(demo.OPTIMIZERS) >= {'ADOPT', 'AdEMAMix', 'StableAdamW', 'Adafactor', 'ScheduleFreeSGD'}
    with pytest.raises(SystemExit): demo.parse_args(['--opt', 'Lionn'])
    assert "unknown optimizer 'Lionn'" in capsys.readouterr().err
    demo.main(['--epochs', '1', '--opt', 'ScheduleFreeAdamW,Muon', '--progress', 'none', '--plot', str(tmp_path/'c.png')])
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith(('ScheduleFreeAdamW', 'Muon'))]
    assert [r[0] for r in rows if len(r) == 4] == ['ScheduleFreeAdamW', 'Muon']
