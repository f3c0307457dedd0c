"""Training runs for the exact-resume tests (test_resume.py). The test runs the first part of each run and the
uninterrupted run itself; this file, run as a script, is the *fresh process* that restores each checkpoint into
new objects and finishes the run:

    python tests/resume_worker.py optimizers DIR NAME...   # plain loop + torch scheduler, one checkpoint per NAME
    python tests/resume_worker.py learner DIR               # fastai Learner, resumed in the middle of fit_one_cycle
"""
import sys
from pathlib import Path
import torch
from torch import nn
from helpers import zoo

FIRST, REST = 7, 8          # steps before and after the checkpoint (7 is mid-way through a Lookahead cycle of 3)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

def build(config):
    "Model, optimizer (two groups: body and head) and OneCycleLR schedule (lr and momentum) for `config`"
    name, execution = config.split(':')
    m = model()
    opt = zoo()[name]([list(m[0].parameters()), list(m[2].parameters())])
    if execution != 'default': opt.execution = execution
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g['lr'] for g in opt.param_groups],
                                                total_steps=FIRST + REST)
    return m, opt, sched

def train(m, opt, sched, steps):
    for i in steps:
        opt.zero_grad()
        x, y = batch(i)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step(); sched.step()

def checkpoint(m, opt, sched): return {'model': m.state_dict(), 'opt': opt.state_dict(), 'sched': sched.state_dict()}

def resume(config, ckpt):
    m, opt, sched = build(config)
    m.load_state_dict(ckpt['model']); opt.load_state_dict(ckpt['opt']); sched.load_state_dict(ckpt['sched'])
    train(m, opt, sched, range(FIRST, FIRST + REST))
    return m

# ---- fastai ----

N_EPOCH, SAVE_AFTER = 4, 2

def learner(path):
    from fastai.basics import Learner, DataLoaders, MSELossFlat
    import fastai.callback.schedule  # fit_one_cycle
    import fastopt
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g); y = x @ torch.randn(6, 1, generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[16:], ds[:16], bs=16, shuffle=False, device='cpu')
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    return Learner(dls, m, loss_func=MSELossFlat(), opt_func=fastopt.ranger, path=path)

def fit(learn, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(N_EPOCH, 1e-2, **kw)

def resume_learner(path):
    learn = learner(path)
    learn.load('ckpt', with_opt=True)
    fit(learn, start_epoch=SAVE_AFTER)
    return learn.model

if __name__ == '__main__':
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == 'optimizers':
        for config in sys.argv[3:]:
            ckpt = torch.load(out/f'{config}.ckpt', weights_only=True)
            torch.save(resume(config, ckpt).state_dict(), out/f'{config}.resumed')
    elif mode == 'learner':
        torch.save(resume_learner(out).state_dict(), out/'learner.resumed')
    else: sys.exit(f'unknown mode {mode!r}')
