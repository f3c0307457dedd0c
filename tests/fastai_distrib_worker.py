"""A fastai Learner with fastopt.ranger under `learn.distrib_ctx()` (fastai's DDP through Hugging Face Accelerate),
on CPU. Launched by test_distributed.py with

    torchrun --standalone --nproc-per-node 2 tests/fastai_distrib_worker.py OUT [--cpu-broadcast]

Each rank saves its final weights, its losses and the optimizer's step count, or the error it hit.
fastai 2.8's `DistributedDL._broadcast` moves the shuffled indices to CUDA unconditionally (for NCCL), so on a
CPU-only torch it fails; `--cpu-broadcast` replaces that one method by the same broadcast on CPU (gloo takes CPU
tensors), which lets the rest of fastai's distributed path run unchanged."""
import os, sys, warnings
from pathlib import Path
import torch
from torch import nn
from fastai.basics import Learner, DataLoaders, MSELossFlat, Callback
from fastai.distributed import DistributedDL   # and Learner.distrib_ctx
import fastai.callback.schedule
import fastopt

class Losses(Callback):
    "Training losses, and the type of the model that trained (the Learner unwraps it after fitting)"
    def before_fit(self): self.values = []
    def after_batch(self):
        if self.training: self.values.append(self.loss.item()); self.wrapped = type(self.model).__name__

N_EPOCH = 6

def learner():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g); y = x @ torch.randn(6, 1, generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[32:], ds[:32], bs=16, shuffle=False, device='cpu')   # the same batches every run
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
    return Learner(dls, model, loss_func=MSELossFlat(), opt_func=fastopt.ranger, cbs=Losses())

def _broadcast_on_cpu(self, t, rank):
    t = torch.LongTensor(t)
    torch.distributed.broadcast(t, rank)
    return t.tolist()

if __name__ == '__main__':
    out = Path(sys.argv[1])
    rank = int(os.environ['RANK'])
    if '--cpu-broadcast' in sys.argv: DistributedDL._broadcast = _broadcast_on_cpu
    learn = learner()
    try:
        with learn.distrib_ctx(cpu=True), learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(N_EPOCH, 5e-2)
    except Exception as e:
        torch.save(dict(error=f'{type(e).__name__}: {e}'), out/f'fastai.rank{rank}.pt')
        sys.exit(0)
    torch.save(dict(weights=learn.model.state_dict(), losses=learn.losses.values, count=learn.opt.count,
                    wrapped=learn.losses.wrapped, n_batches=len(learn.losses.values)), out/f'fastai.rank{rank}.pt')
