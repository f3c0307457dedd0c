"""fastopt optimizers under DDP, ZeRO and FSDP2, compared with a single-process run on the full batches.

    torchrun --standalone --nproc-per-node 2 examples/distributed_training.py

Runs on CPU with the gloo backend (on GPUs, use 'nccl' and move the model to the rank's device). Rank 0 prints,
for each engine and optimizer, the largest difference from the single-process weights and whether every rank
holds the same weights."""
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.fsdp import fully_shard
import fastopt

STEPS, BATCH = 20, 16

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 8, generator=g)
        yield x, x.sum(1, keepdim=True).sin()

def train(model, opt, rank=0, world=1):
    n = BATCH // world                                   # each rank takes its slice of every batch
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rank*n:(rank+1)*n]), y[rank*n:(rank+1)*n]).backward()
        opt.step()

def single_process(make_opt):
    model = make_model(); train(model, make_opt(model.parameters()))
    return [p.detach() for p in model.parameters()]

def ddp(make_opt, rank, world):
    model = DDP(make_model()); train(model, make_opt(model.parameters()), rank, world)
    return [p.detach() for p in model.parameters()]

def zero(make_opt, rank, world):
    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=make_opt)   # each rank: state of its share
    train(model, opt, rank, world)
    return [p.detach() for p in model.parameters()]

def fsdp2(make_opt, rank, world):
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear): fully_shard(layer)
    fully_shard(model)                                   # parameters are now DTensors, sharded on dim 0
    train(model, make_opt(model.parameters()), rank, world)
    return [p.full_tensor() for p in model.parameters()]

OPTIMIZERS = {'ranger': lambda ps: fastopt.ranger(ps, lr=1e-2), 'Adam': lambda ps: fastopt.Adam(ps, lr=1e-2),
              'Lamb': lambda ps: fastopt.Lamb(ps, lr=1e-2), 'SGD': lambda ps: fastopt.SGD(ps, lr=0.05, mom=0.9)}

def same_on_every_rank(weights, world):
    gathered = [None] * world
    dist.all_gather_object(gathered, weights)
    return all(torch.equal(a, b) for other in gathered for a, b in zip(other, weights))

if __name__ == '__main__':
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for name, make_opt in OPTIMIZERS.items():
        expected = single_process(make_opt)
        for engine in (ddp, zero, fsdp2):
            got = engine(make_opt, rank, world)
            diff = max((a - b).abs().max().item() for a, b in zip(got, expected))
            rows.append((engine.__name__, name, diff, same_on_every_rank(got, world)))
    if rank == 0:
        print(f'{world} processes, {STEPS} steps')
        print(f"{'engine':8}{'optimizer':11}{'max |w - w_single|':>20}  same on every rank")
        for engine, name, diff, same in rows: print(f'{engine:8}{name:11}{diff:20.2e}  {same}')
    dist.destroy_process_group()
