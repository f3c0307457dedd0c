"Shared helpers: identical parameter sets and gradient streams for differential tests"
import torch

def make_groups(shapes_per_group, seed=0, dtype=torch.float32):
    "Fresh leaf tensors, one list per group, with reproducible values"
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for shapes in shapes_per_group]

def clone_groups(groups):
    return [[p.detach().clone() for p in g] for g in groups]

def gradient_stream(groups, n_steps, seed=1):
    "A list (one per step) of gradients, one per parameter, in group order"
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for g in groups for p in g] for _ in range(n_steps)]

def run(opt, groups, grads):
    "Step `opt` once per entry of `grads`, setting each parameter's gradient first (a fresh copy each time)"
    flat = [p for g in groups for p in g]
    for step_grads in grads:
        for p, g in zip(flat, step_grads): p.grad = g.clone()
        opt.step()
    return flat

SHAPES = [[(5, 4), (4,)], [(3, 3, 2), (7,), ()]]   # two groups, including a 0-d parameter

def _optim_wrapper(ps, **kw):
    import fastopt
    return fastopt.OptimWrapper(ps, torch.optim.AdamW, lr=1e-2, weight_decay=1e-2, **kw)

def zoo():
    "Every optimizer the reliability promises cover: name -> factory(params), with hyper-parameters that move weights"
    import fastopt
    return {
        'SGD': lambda ps: fastopt.SGD(ps, lr=0.05, mom=0.9, wd=1e-2),
        'RMSProp': lambda ps: fastopt.RMSProp(ps, lr=1e-2, mom=0.9),
        'Adam': lambda ps: fastopt.Adam(ps, lr=1e-2),
        'RAdam': lambda ps: fastopt.RAdam(ps, lr=1e-2),
        'QHAdam': lambda ps: fastopt.QHAdam(ps, lr=1e-2),
        'Larc': lambda ps: fastopt.Larc(ps, lr=0.05),
        'Lamb': lambda ps: fastopt.Lamb(ps, lr=1e-2),
        'Lookahead': lambda ps: fastopt.Lookahead(fastopt.Adam(ps, lr=1e-2), k=3),
        'ranger': lambda ps: fastopt.ranger(ps, lr=1e-2, k=3),
        'OptimWrapper': _optim_wrapper,
    }

def train_then_freeze(opt, groups, grads):
    "Freeze the first group, `zero_grad(set_to_none=False)` (the frozen group keeps zeroed gradients), train on"
    flat = [p for g in groups for p in g]
    opt.freeze(); opt.zero_grad(set_to_none=False)
    for step_grads in grads:
        for p, g in zip(flat, step_grads):
            if p.requires_grad: p.grad = g.clone()
        opt.step()
    return flat

def plain_torch_run(opt, groups, grads, n_frozen_after):
    "Step torch optimizer `opt`; after `n_frozen_after` steps the first group gets no gradient (what torch expects)"
    flat, frozen = [p for g in groups for p in g], {id(p) for p in groups[0]}
    for i, step_grads in enumerate(grads):
        for p, g in zip(flat, step_grads): p.grad = None if i >= n_frozen_after and id(p) in frozen else g.clone()
        opt.step()
    return flat
