"""Time one optimizer step: fastopt against fastai 2.8 and torch.optim, side by side, in one run.

    .venv/bin/python benchmarks/bench_step.py            # the full table (about five minutes on 2 idle cores)
    .venv/bin/python benchmarks/bench_step.py --help     # options: sets, optimizers, repeats, device, markdown

For each parameter set and optimizer, every implementation gets its own copy of the weights and gradients and
is warmed up (state created, kernels compiled); then rounds run each implementation once, in turn, so that
machine noise hits all of them alike. Reported per implementation: the median step time, its ratio to torch's
fused AdamW on the same set (timed in the same rounds), its ratio to the memory-bandwidth floor of the
algorithm (the bytes a step must read and write, divided by the bandwidth of a copy of the set's size timed in the
same rounds), and the
peak memory the step allocates beyond its state (from torch's profiler). fastopt's first step, compilation
included, is timed separately with an empty kernel cache. Every fastopt row must run fused: after the warm-up the
benchmark stops if any parameter took the per-parameter path (`execution_counts['per_param']`).

Sets are lists of tensor shapes, or lists of groups of shapes (one param group each: lists of lists for fastopt and
fastai, group dicts for torch); a set named `*-bf16` holds bfloat16 parameters and gradients, on which fastopt runs
AdamW once per `update_rounding` and torch keeps its state in bfloat16. `AdamW-bf16state` is fastopt's Adam with
`state_dtype=torch.bfloat16` on float32 parameters (timed against torch's fused AdamW with its float32 state).
"""
from __future__ import annotations
import argparse, gc, os, platform, random, statistics, sys, tempfile, time, warnings
import torch

# The weight shapes of torchvision's ResNet-18 (62 tensors, 11.7M floats), listed here so torchvision is not needed
RESNET18 = ([(64, 3, 7, 7), (64,), (64,)] + [(64, 64, 3, 3), (64,), (64,)] * 4
    + [(128, 64, 3, 3), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128, 64, 1, 1), (128,), (128,)]
    + [(128, 128, 3, 3), (128,), (128,)] * 2
    + [(256, 128, 3, 3), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (256, 128, 1, 1), (256,), (256,)]
    + [(256, 256, 3, 3), (256,), (256,)] * 2
    + [(512, 256, 3, 3), (512,), (512,), (512, 512, 3, 3), (512,), (512,), (512, 256, 1, 1), (512,), (512,)]
    + [(512, 512, 3, 3), (512,), (512,)] * 2 + [(1000, 512), (1000,)])
SETS = {'200x4K': [(4096,)] * 200, 'resnet18': RESNET18, '4x4M': [(4 * 2**20,)] * 4,
        '1000x100': [(100,)] * 1000,                   # many tiny tensors: the step's fixed cost per tensor
        '200g5x100': [[(100,)] * 5] * 200,             # 200 param groups of 5 tensors: the cost per group
        '52g4x20K': [[(20_000,)] * 4] * 52,            # 52 groups of 4 mid-sized tensors (a layer-wise lr schedule)
        'resnet18-bf16': RESNET18}                     # bfloat16 parameters, gradients and (torch's) state
SET_DTYPES = {'resnet18-bf16': torch.bfloat16}         # the parameters' dtype where it is not float32

# The memory traffic a step must make, the physical floor, per element: (passes over the parameter, over the
# gradient, over each state tensor), a pass being one read or one write. SGD reads p, g, m and writes p, m; the Adam
# family reads p, g, m, v and writes p, m, v; RMSProp (no momentum) reads p, g, v and writes p, v; LAMB needs the
# norms before it can write p, so a second pass reads p, m, v and writes p; ranger adds Lookahead's sync every 6
# steps (read and write p and the slow weights). Bytes are those passes times each tensor's element size (float32 4,
# bfloat16 2, the state's own dtype for the state); Kahan rounding of a low-precision parameter adds a read and a
# write of its compensation buffer (the parameter's dtype); stochastic and nearest rounding add nothing.
FLOOR_PASSES = {'SGD-mom': (2, 1, 2), 'AdamW': (2, 1, 4), 'AdamW-bf16state': (2, 1, 4), 'RAdam': (2, 1, 4),
                'QHAdam': (2, 1, 4), 'RMSProp': (2, 1, 2), 'Lamb': (3, 1, 6), 'ranger': (2 + 2/6, 1, 4 + 2/6)}

def floor_bytes(opt:str, param_bytes:int, state_bytes:int, kahan:bool) -> float:
    "Bytes per element a step of `opt` must read and write (gradients in the parameters' dtype)"
    p, g, s = FLOOR_PASSES[opt]
    return p * param_bytes + g * param_bytes + s * state_bytes + (2 * param_bytes if kahan else 0)

HYPERS = dict(lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5)

def fast_params(groups:list) -> list:
    "Parameters as fastopt and fastai take them: one list, or a list of lists (one per group)"
    return groups[0] if len(groups) == 1 else groups

def torch_params(groups:list) -> list:
    "Parameters as torch.optim takes them: one dict per group"
    return [{'params': g} for g in groups]

def with_settings(opt, **settings):
    "`opt` with fastopt settings (`update_rounding`, `state_dtype`) set"
    for k, v in settings.items(): setattr(opt, k, v)
    return opt

ROUNDINGS = ('kahan', 'stochastic', 'nearest')

def implementations(name:str, dtype=torch.float32) -> list:
    """(label, factory, state dtype, Kahan?) of each implementation of `name` on parameters of `dtype`: a factory
    takes a list of groups of parameters and returns an optimizer; the state dtype and Kahan set the floor"""
    import fastopt, fastai.optimizer as fa
    lr, mom, sqr_mom, eps = HYPERS['lr'], HYPERS['mom'], HYPERS['sqr_mom'], HYPERS['eps']
    low = dtype in (torch.bfloat16, torch.float16)
    fp = fast_params
    def fastopt_rows(make, roundings=('kahan',)):
        "fastopt's rows: on low-precision parameters one per rounding, labelled with it"
        if not low: return [('fastopt', lambda gs: make(fp(gs)), dtype, False)]
        return [(f'fastopt {r}', lambda gs, r=r: with_settings(make(fp(gs)), update_rounding=r), dtype, r == 'kahan')
                for r in roundings]
    def torch_rows(cls, kinds, **kw):
        return [(f'torch {k}', lambda gs, k=k: cls(torch_params(gs), **kw, **TORCH_KINDS[k]), dtype, False) for k in kinds]
    fastai = lambda make: [('fastai', lambda gs: make(fp(gs)), dtype, False)]
    if name == 'SGD-mom':
        return (fastopt_rows(lambda ps: fastopt.SGD(ps, lr, mom=mom)) + fastai(lambda ps: fa.SGD(ps, lr, mom=mom))
                + torch_rows(torch.optim.SGD, ('for-loop', 'foreach', 'fused'), lr=lr, momentum=mom))
    if name == 'AdamW':
        kw = dict(lr=lr, betas=(mom, sqr_mom), eps=eps, weight_decay=0.01)
        return (fastopt_rows(lambda ps: fastopt.Adam(ps, lr, mom, sqr_mom, eps, wd=0.01), ROUNDINGS)
                + fastai(lambda ps: fa.Adam(ps, lr, mom, sqr_mom, eps, wd=0.01))
                + torch_rows(torch.optim.AdamW, ('for-loop', 'foreach', 'fused'), **kw))
    if name == 'AdamW-bf16state':   # only on float32 parameters: on bfloat16 ones the state is bfloat16 anyway
        if low: return []
        return [('fastopt', lambda gs: with_settings(fastopt.Adam(fp(gs), lr, mom, sqr_mom, eps, wd=0.01),
                                                      state_dtype=torch.bfloat16), torch.bfloat16, False)]
    if name == 'RAdam':
        return (fastopt_rows(lambda ps: fastopt.RAdam(ps, lr, mom, sqr_mom, eps))
                + fastai(lambda ps: fa.RAdam(ps, lr, mom, sqr_mom, eps))
                + torch_rows(torch.optim.RAdam, ('for-loop', 'foreach'), lr=lr, betas=(mom, sqr_mom), eps=eps))
    if name == 'RMSProp':
        return (fastopt_rows(lambda ps: fastopt.RMSProp(ps, lr)) + fastai(lambda ps: fa.RMSProp(ps, lr))
                + torch_rows(torch.optim.RMSprop, ('for-loop', 'foreach'), lr=lr, alpha=0.99, eps=1e-8))
    if name == 'QHAdam':
        return fastopt_rows(lambda ps: fastopt.QHAdam(ps, lr)) + fastai(lambda ps: fa.QHAdam(ps, lr))
    if name == 'Lamb':
        return fastopt_rows(lambda ps: fastopt.Lamb(ps, lr)) + fastai(lambda ps: fa.Lamb(ps, lr))
    if name == 'ranger':
        return fastopt_rows(lambda ps: fastopt.ranger(ps, lr)) + fastai(lambda ps: fa.ranger(ps, lr))
    raise ValueError(name)

TORCH_KINDS = {'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}
OPTIMIZERS = list(FLOOR_PASSES)

def set_groups(spec:list) -> list:
    "A set's groups of shapes: the set itself if it lists groups, else one group"
    return [list(g) for g in spec] if spec and isinstance(spec[0], list) else [list(spec)]

def make_params(groups, device, dtype=torch.float32, seed=0):
    "Groups of parameters of `dtype`, each with a gradient of its dtype"
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shapes in groups:
        ps = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
        for p in ps: p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device, dtype)
        out.append(ps)
    return out

def fastopt_counts(opt) -> dict|None:
    "fastopt's `execution_counts` (of the wrapped optimizer for Lookahead), or None for another library's optimizer"
    inner = getattr(opt, 'opt', opt)
    return getattr(inner, 'execution_counts', None) if type(inner).__module__.startswith('fastopt') else None

def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()

def timed(fn, device) -> float:
    sync(device); t = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t

def copy_step(n:int, device:str, dtype=torch.float32):
    "A function copying `n` elements of `dtype` (one read and one write each): the bandwidth probe of a set"
    src, dst = torch.randn(n, device=device).to(dtype), torch.empty(n, device=device, dtype=dtype)
    dst.copy_(src)
    return lambda: dst.copy_(src)

def peak_extra_bytes(step, device:str) -> int|None:
    "The most memory one call of `step` holds at once beyond what existed before it (torch's profiler)"
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with profile(activities=acts, profile_memory=True) as prof: step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']  # private, stable API
    except Exception: return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes(); peak = max(peak, current)
    return peak

def first_step_seconds(factory, groups, device, dtype) -> float:
    "fastopt's first step on fresh parameters, with an empty kernel cache: compilation included"
    import fastopt.engine.cpu as cpu, fastopt.engine.plan as plan
    saved_env, saved = os.environ.get('FASTOPT_CACHE_DIR'), (dict(cpu._loaded), dict(plan._kernels))
    with tempfile.TemporaryDirectory() as d:
        os.environ['FASTOPT_CACHE_DIR'] = d
        cpu._loaded.clear(); plan._kernels.clear()
        try:
            opt = factory(make_params(groups, device, dtype))
            return timed(opt.step, device)
        finally:
            if saved_env is None: os.environ.pop('FASTOPT_CACHE_DIR', None)
            else: os.environ['FASTOPT_CACHE_DIR'] = saved_env
            for cache, old in zip((cpu._loaded, plan._kernels), saved): cache.clear(); cache.update(old)

def bench_set(set_name, groups, optimizers, device, repeats, warmup, dtype=torch.float32):
    "Rows of results for one parameter set (`groups`: lists of shapes, one per param group)"
    n_floats = sum(torch.Size(s).numel() for g in groups for s in g)
    elt = torch.empty(0, dtype=dtype).element_size()
    # the copy is timed in the same rounds as the steps: its bandwidth drifts with the machine's load like them
    copy = dict(step=copy_step(n_floats, device, dtype), times=[])
    # the baseline of every ratio: torch's fused AdamW on the same parameters
    contenders = [('AdamW', *next(i for i in implementations('AdamW', dtype) if i[0] == 'torch fused'))]
    for name in optimizers:
        contenders += [(name, *i) for i in implementations(name, dtype) if (name, i[0]) != contenders[0][:2]]
    runs = []
    for name, label, factory, state_dtype, kahan in contenders:
        try:
            opt = factory(make_params(groups, device, dtype))
            for _ in range(warmup): opt.step()
        except Exception as e:   # e.g. a fused kernel torch lacks on this device or dtype
            print(f'  skipped {set_name} {name} {label}: {type(e).__name__}: {e}', file=sys.stderr); continue
        counts = fastopt_counts(opt)
        if counts is not None:   # every fastopt row runs fused: a fallback is a failure, never a quiet slow row
            inner = getattr(opt, 'opt', opt)
            assert counts['per_param'] == 0 and counts['fused'] > 0, (
                f"{set_name} {name} {label}: {counts['per_param']} parameter-steps ran per-parameter after "
                f"{warmup} warm-up steps: {inner.fallback_reasons}")
        first = first_step_seconds(factory, groups, device, dtype) if counts is not None else None
        floor = floor_bytes(name, elt, torch.empty(0, dtype=state_dtype).element_size(), kahan)   # per element
        runs.append(dict(set=set_name, opt=name, impl=label, step=opt.step, times=[], first=first, device=device,
                         peak=peak_extra_bytes(opt.step, device), opt_obj=opt, floor=floor, counts=counts))
    rng = random.Random(0)
    for _ in range(repeats):   # interleaved: one step of each implementation per round, in a shuffled order
        for r in rng.sample(runs + [copy], len(runs) + 1): r['times'].append(timed(r['step'], device))
    bandwidth = 2 * elt * n_floats / statistics.median(copy['times'])
    base_times = runs[0]['times']   # torch fused AdamW, timed in the same rounds
    base = statistics.median(base_times)
    rows = []
    for r in runs:
        if r['counts'] is not None: assert r['counts']['per_param'] == 0, f"{set_name} {r['opt']} {r['impl']} fell back"
        if r is runs[0] and 'AdamW' not in optimizers: continue
        med = statistics.median(r['times'])
        # the ratio within each round, then the median: robust to the machine's load drifting between rounds
        vs_fused = statistics.median(t / b for t, b in zip(r['times'], base_times))
        # the floor of a round: the step's bytes at the copy's bandwidth in that round (a copy moves 2 * elt bytes)
        vs_floor = statistics.median(t / c for t, c in zip(r['times'], copy['times'])) * 2 * elt / r['floor']
        rows.append(dict(set=r['set'], opt=r['opt'], impl=r['impl'], ms=med * 1e3, vs_fused=vs_fused,
                         vs_floor=vs_floor, peak_mb=None if r['peak'] is None else r['peak'] / 2**20,
                         first_s=r['first']))
    info = dict(set=set_name, groups=len(groups), tensors=sum(map(len, groups)), floats=n_floats,
                dtype=str(dtype).replace('torch.', ''), bandwidth=bandwidth, fused_ms=base * 1e3)
    for r in runs: r.clear()
    gc.collect()
    return info, rows

def cpu_name() -> str:
    "The CPU's model name, as /proc/cpuinfo gives it"
    try:
        with open('/proc/cpuinfo') as f:
            return next(l.split(':', 1)[1].strip() for l in f if l.lower().startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or 'unknown'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sets', nargs='+', default=list(SETS), choices=list(SETS), help='parameter sets')
    ap.add_argument('--optimizers', nargs='+', default=OPTIMIZERS, choices=OPTIMIZERS, help='optimizers')
    ap.add_argument('--repeats', type=int, default=25, help='timed rounds (the median is reported)')
    ap.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    ap.add_argument('--scale', type=float, default=1.0, help='divide every tensor size by this (a quick smoke run)')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    args = ap.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available(): ap.error('CUDA is not available here')
    gpu = torch.cuda.get_device_name() if args.device.startswith('cuda') else None
    import fastai
    print(f"# One optimizer step: medians of {args.repeats} interleaved rounds\n")
    print(f"torch {torch.__version__}, fastai {fastai.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads" + (f", GPU: {gpu}" if gpu else f", CPU: {cpu_name()}")
          + "\n")
    all_info, all_rows = [], []
    for s in args.sets:
        groups = [[tuple(max(1, int(d / args.scale)) if i == 0 else d for i, d in enumerate(sh)) for sh in g]
                  for g in set_groups(SETS[s])]
        info, rows = bench_set(s, groups, args.optimizers, args.device, args.repeats, args.warmup,
                               SET_DTYPES.get(s, torch.float32))
        all_info.append(info); all_rows += rows
    print('| set | groups | tensors | floats | dtype | copy bandwidth | torch fused AdamW |\n'
          '|---|---:|---:|---:|---|---:|---:|')
    for i in all_info:
        print(f"| {i['set']} | {i['groups']} | {i['tensors']} | {i['floats']:,} | {i['dtype']} "
              f"| {i['bandwidth']/1e9:.1f} GB/s | {i['fused_ms']:.2f} ms |")
    print('\n| set | optimizer | implementation | median ms | × torch fused AdamW | × bandwidth floor '
          '| peak extra MiB | first step s |\n|---|---|---|---:|---:|---:|---:|---:|')
    for r in all_rows:
        peak = '' if r['peak_mb'] is None else f"{r['peak_mb']:.1f}"
        first = '' if r['first_s'] is None else f"{r['first_s']:.2f}"
        print(f"| {r['set']} | {r['opt']} | {r['impl']} | {r['ms']:.2f} | {r['vs_fused']:.2f} | {r['vs_floor']:.2f} "
              f"| {peak} | {first} |")
    return all_info, all_rows

if __name__ == '__main__': main()
