"""Training runs for the low-precision exact-resume test (test_engine_dtypes.py). The test runs the first part of
each run and the uninterrupted run itself; this file, run as a script, is the *fresh process* that loads each
checkpoint (`torch.load(weights_only=True)`) into new objects and finishes the run:

    python tests/engine_resume_worker.py DIR CONFIG...   # reads DIR/CONFIG.ckpt, writes DIR/CONFIG.resumed

A config is `optimizer:parameter dtype:update_rounding:state_dtype:execution`.
"""
import sys
from pathlib import Path
import torch
from torch import nn
import fastopt

FIRST, REST = 7, 8          # steps before and after the checkpoint (7 is mid-way through a Lookahead cycle of 3)
SEED = 1234                 # the stochastic-rounding seed: a setting, so the resumed run sets it again
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32, 'none': None}
OPTIMIZERS = {
    'Adam': lambda ps: fastopt.Adam(ps, lr=1e-2),
    'Lamb': lambda ps: fastopt.Lamb(ps, lr=1e-2),
    'ranger': lambda ps: fastopt.ranger(ps, lr=1e-2, k=3),
}
CONFIGS = [f'{o}:{d}:{r}:{s}:{ex}' for o, d, r, s, ex in [
    ('Adam', 'bf16', 'stochastic', 'none', 'auto'), ('Adam', 'bf16', 'stochastic', 'none', 'per_param'),
    ('ranger', 'bf16', 'stochastic', 'none', 'auto'), ('Adam', 'bf16', 'kahan', 'none', 'auto'),
    ('ranger', 'bf16', 'kahan', 'fp32', 'per_param'), ('Lamb', 'fp16', 'stochastic', 'fp32', 'auto'),
    ('Adam', 'fp32', 'kahan', 'bf16', 'auto'), ('Lamb', 'fp32', 'nearest', 'bf16', 'per_param')]]

class Cast(nn.Module):
    "Cast the input to `dtype` (the model's first and last layer, so that data and loss stay float32)"
    def __init__(self, dtype): super().__init__(); self.dtype = dtype
    def forward(self, x): return x.to(self.dtype)

def model(dtype):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    return nn.Sequential(Cast(dtype), body, Cast(torch.float32))

def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

def build(config):
    "Model and optimizer (two groups: the two linear layers) for `config`, its settings set as attributes"
    name, dtype, rounding, state_dtype, execution = config.split(':')
    m = model(DTYPES[dtype])
    opt = OPTIMIZERS[name]([list(m[1][0].parameters()), list(m[1][2].parameters())])
    opt.update_rounding, opt.state_dtype, opt.seed, opt.execution = rounding, DTYPES[state_dtype], SEED, execution
    return m, opt

def train(m, opt, steps):
    for i in steps:
        opt.zero_grad()
        x, y = batch(i)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()

def checkpoint(m, opt): return {'model': m.state_dict(), 'opt': opt.state_dict()}

def resume(config, ckpt):
    m, opt = build(config)
    m.load_state_dict(ckpt['model']); opt.load_state_dict(ckpt['opt'])
    train(m, opt, range(FIRST, FIRST + REST))
    return checkpoint(m, opt)

if __name__ == '__main__':
    out = Path(sys.argv[1])
    for config in sys.argv[2:]:
        ckpt = torch.load(out/f'{config}.ckpt', weights_only=True)
        torch.save(resume(config, ckpt), out/f'{config}.resumed')
