"""Multi-process jobs for test_distributed.py. Each of the 2 processes runs

    python tests/dist_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR SCENARIO...

joins a gloo process group on loopback (rendezvous through a file, so no port is chosen), runs each scenario
and saves what it found to OUT_DIR/SCENARIO.rankR.pt (or the error it hit), then leaves the group.
`reference` computes the single-process run on full batches that each scenario must reproduce."""
import sys, traceback
from pathlib import Path
import torch
from torch import nn
import fastopt

STEPS, FIRST, BATCH = 12, 5, 8        # FIRST: steps before a checkpoint (mid-way through a Lookahead cycle of 3)

OPTIMIZERS = {
    'SGD': lambda ps: fastopt.SGD(ps, lr=0.05, mom=0.9, wd=1e-2),
    'Adam': lambda ps: fastopt.Adam(ps, lr=1e-2),
    'RAdam': lambda ps: fastopt.RAdam(ps, lr=1e-2),
    'Lamb': lambda ps: fastopt.Lamb(ps, lr=1e-2),
    'Larc': lambda ps: fastopt.Larc(ps, lr=0.05),
    'ranger': lambda ps: fastopt.ranger(ps, lr=1e-2, k=3),
}

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)

def train(m, opt, steps, rank=0, world=1):
    "Each rank takes its slice of every batch (the whole batch when alone)"
    n = BATCH // world
    for i in steps:
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(m(x[rank*n:(rank+1)*n]), y[rank*n:(rank+1)*n]).backward()
        opt.step()

def inner(opt): return opt.opt if isinstance(opt, fastopt.Lookahead) else opt

def reference(name, steps=STEPS, execution='auto'):
    "The single-process run on full batches"
    m = model(); opt = OPTIMIZERS[name](m.parameters()); inner(opt).execution = execution
    train(m, opt, range(steps))
    return m.state_dict()

# ---- scenarios: each returns a dict of findings ----

def ddp(rank, world, name, execution):
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = DDP(model()); opt = OPTIMIZERS[name](m.parameters()); inner(opt).execution = execution
    train(m, opt, range(STEPS), rank, world)
    return dict(weights=m.module.state_dict(), counts=dict(inner(opt).execution_counts))

def zero(rank, world, name, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.optim import ZeroRedundancyOptimizer
    cls = getattr(fastopt, name)
    m = DDP(model()); opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=cls, lr=1e-2)
    train(m, opt, range(FIRST), rank, world)
    opt.consolidate_state_dict(to=0)
    ckpt = out/f'zero-{name}.ckpt'
    if rank == 0: torch.save({'model': m.module.state_dict(), 'opt': opt.state_dict()}, ckpt)
    dist.barrier()
    local_state = sum(1 for s in opt.optim.state.values() if s)      # parameters whose state this rank holds
    train(m, opt, range(FIRST, STEPS), rank, world)
    loaded = torch.load(ckpt, weights_only=True)
    m2 = DDP(model()); m2.module.load_state_dict(loaded['model'])
    opt2 = ZeroRedundancyOptimizer(m2.parameters(), optimizer_class=cls, lr=1e-2)
    opt2.load_state_dict(loaded['opt'])
    train(m2, opt2, range(FIRST, STEPS), rank, world)
    return dict(weights=m.module.state_dict(), resumed=m2.module.state_dict(), local_state=local_state,
                n_params=len(list(m.parameters())))

def sharded_model():
    from torch.distributed.fsdp import fully_shard
    m = model()
    for layer in (m[0], m[2]): fully_shard(layer)
    return fully_shard(m)

def full_weights(m): return {k: v.full_tensor() for k, v in m.state_dict().items()}

class CountAllReduce:
    "Counts torch.distributed.all_reduce calls (the fused engine's collectives on shards) while active"
    def __enter__(self):
        import torch.distributed as dist
        self.dist, self.orig, self.count = dist, dist.all_reduce, 0
        def counted(*args, **kwargs):
            self.count += 1
            return self.orig(*args, **kwargs)
        dist.all_reduce = counted
        return self
    def __exit__(self, *exc): self.dist.all_reduce = self.orig

def fsdp(rank, world, name, execution='auto'):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    m = sharded_model(); opt = OPTIMIZERS[name](m.parameters()); inner(opt).execution = execution
    train(m, opt, range(STEPS - 1), rank, world)
    opt.zero_grad()
    x, y = batch(STEPS - 1); n = BATCH // world
    nn.functional.mse_loss(m(x[rank*n:(rank+1)*n]), y[rank*n:(rank+1)*n]).backward()
    with CommDebugMode() as comm, CountAllReduce() as engine: opt.step()   # the last step (a Lookahead sync: 12 % 3 == 0)
    planner = inner(opt).__dict__.get('_planner')
    buckets = [b for gp in planner.plans.values() for b in gp.buckets] if planner else []
    res = dict(weights=full_weights(m), counts=dict(inner(opt).execution_counts), reasons=inner(opt).fallback_reasons,
               step_collectives=comm.get_total_counts(), engine_all_reduces=engine.count,
               buckets=len(buckets), backends=sorted({b.backend for b in buckets}),
               local_shapes=[tuple(p.to_local().shape) for p in m.parameters()])
    if isinstance(opt, fastopt.Lookahead):
        slow = [s for g in opt.slow_weights for s in g]
        res['slow_sharded_like_params'] = all(isinstance(s, DTensor) and s.placements == p.placements and
                                              s.to_local().shape == p.to_local().shape
                                              for s, p in zip(slow, m.parameters()))
    return res

def fsdp_strict(rank, world):
    "execution='fused' (strict): every shard runs fused, or the step raises"
    m = sharded_model(); opt = fastopt.Lamb(m.parameters(), lr=1e-2); opt.execution = 'fused'
    train(m, opt, range(STEPS), rank, world)
    return dict(weights=full_weights(m), counts=dict(opt.execution_counts),
                state_is_sharded=all(isinstance(v, type(p)) for p in m.parameters() for k, v in opt.state[p].items()
                                     if torch.is_tensor(v) and v.dim() > 0))

def fsdp_checkpoint(rank, world, out):
    "A sharded ranger run checkpointed with torch.distributed.checkpoint, resumed into fresh objects"
    import torch.distributed.checkpoint as dcp
    from fastopt.distributed import distributed_state_dict, load_distributed_state_dict
    m = sharded_model(); opt = OPTIMIZERS['ranger'](m.parameters())
    train(m, opt, range(FIRST), rank, world)
    dcp.save(distributed_state_dict(m, opt), checkpoint_id=out/'dcp-ranger')
    train(m, opt, range(FIRST, STEPS), rank, world)
    m2 = sharded_model(); opt2 = OPTIMIZERS['ranger'](m2.parameters())
    sd = distributed_state_dict(m2, opt2)                  # the template: every tensor, sharded as it will be used
    dcp.load(sd, checkpoint_id=out/'dcp-ranger')
    load_distributed_state_dict(m2, opt2, sd)
    count = opt2.count
    train(m2, opt2, range(FIRST, STEPS), rank, world)
    return dict(weights=full_weights(m), resumed=full_weights(m2), count_after_load=count)

SCENARIOS = {'ddp': ddp, 'zero': zero, 'fsdp': fsdp, 'fsdp_strict': fsdp_strict, 'fsdp_checkpoint': fsdp_checkpoint}

NEEDS_OUT = {'zero', 'fsdp_checkpoint'}   # scenarios that write checkpoints to OUT_DIR

def run(scenario, rank, world, out):
    kind, *args = scenario.split(':')
    return SCENARIOS[kind](rank, world, *args, *([out] if kind in NEEDS_OUT else []))

if __name__ == '__main__':
    import torch.distributed as dist
    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world)
    try:
        for scenario in sys.argv[5:]:
            try: res = run(scenario, rank, world, out)
            except Exception: res = dict(error=traceback.format_exc())
            torch.save(res, out/f'{scenario}.rank{rank}.pt')
            dist.barrier()
    finally: dist.destroy_process_group()
