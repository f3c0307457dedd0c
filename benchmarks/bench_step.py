"""Time one optimizer step: fastopt against fastai 2.8 and torch.optim, side by side, in one run.

    .venv/bin/python benchmarks/bench_step.py            # the full table (about two minutes on 2 cores)
    .venv/bin/python benchmarks/bench_step.py --help     # options: sets, optimizers, repeats, device, markdown

For each parameter set and optimizer, every implementation gets its own copy of the weights and gradients and
is warmed up (state created, kernels compiled); then rounds run each implementation once, in turn, so that
machine noise hits all of them alike. Reported per implementation: the median step time, its ratio to torch's
fused AdamW on the same set (timed in the same rounds), its ratio to the memory-bandwidth floor of the
algorithm (the bytes a step must read and write, divided by the copy bandwidth measured in this run), and the
peak memory the step allocates beyond its state (from torch's profiler). fastopt's first step, compilation
included, is timed separately with an empty kernel cache.
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
SETS = {'200x4K': [(4096,)] * 200, 'resnet18': RESNET18, '4x4M': [(4 * 2**20,)] * 4}

# Bytes per element that a step must read plus write (4 per float32 tensor pass), the physical floor:
# SGD reads p, g, m and writes p, m; the Adam family reads p, g, m, v and writes p, m, v; RMSProp (no momentum)
# reads p, g, v and writes p, v; LAMB needs the norms before it can write p, so a second pass reads p, m, v and
# writes p; ranger adds Lookahead's sync every 6 steps (read and write p and the slow weights).
FLOOR_PASSES = {'SGD-mom': 5, 'AdamW': 7, 'RAdam': 7, 'QHAdam': 7, 'RMSProp': 5, 'Lamb': 10, 'ranger': 7 + 4/6}
HYPERS = dict(lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5)

def implementations(name:str):
    "(label, factory) pairs: each factory takes a list of parameters and returns an optimizer"
    import fastopt, fastai.optimizer as fa
    lr, mom, sqr_mom, eps = HYPERS['lr'], HYPERS['mom'], HYPERS['sqr_mom'], HYPERS['eps']
    if name == 'SGD-mom':
        return [('fastopt', lambda ps: fastopt.SGD(ps, lr, mom=mom)), ('fastai', lambda ps: fa.SGD(ps, lr, mom=mom)),
                *[(f'torch {k}', lambda ps, k=k: torch.optim.SGD(ps, lr, momentum=mom, **TORCH_KINDS[k]))
                  for k in ('for-loop', 'foreach', 'fused')]]
    if name == 'AdamW':
        kw = dict(lr=lr, betas=(mom, sqr_mom), eps=eps, weight_decay=0.01)
        return [('fastopt', lambda ps: fastopt.Adam(ps, lr, mom, sqr_mom, eps, wd=0.01)),
                ('fastai', lambda ps: fa.Adam(ps, lr, mom, sqr_mom, eps, wd=0.01)),
                *[(f'torch {k}', lambda ps, k=k: torch.optim.AdamW(ps, **kw, **TORCH_KINDS[k]))
                  for k in ('for-loop', 'foreach', 'fused')]]
    if name == 'RAdam':
        kw = dict(lr=lr, betas=(mom, sqr_mom), eps=eps)
        return [('fastopt', lambda ps: fastopt.RAdam(ps, lr, mom, sqr_mom, eps)),
                ('fastai', lambda ps: fa.RAdam(ps, lr, mom, sqr_mom, eps)),
                *[(f'torch {k}', lambda ps, k=k: torch.optim.RAdam(ps, **kw, **TORCH_KINDS[k]))
                  for k in ('for-loop', 'foreach')]]
    if name == 'RMSProp':
        return [('fastopt', lambda ps: fastopt.RMSProp(ps, lr)), ('fastai', lambda ps: fa.RMSProp(ps, lr)),
                *[(f'torch {k}', lambda ps, k=k: torch.optim.RMSprop(ps, lr, alpha=0.99, eps=1e-8, **TORCH_KINDS[k]))
                  for k in ('for-loop', 'foreach')]]
    if name == 'QHAdam':
        return [('fastopt', lambda ps: fastopt.QHAdam(ps, lr)), ('fastai', lambda ps: fa.QHAdam(ps, lr))]
    if name == 'Lamb':
        return [('fastopt', lambda ps: fastopt.Lamb(ps, lr)), ('fastai', lambda ps: fa.Lamb(ps, lr))]
    if name == 'ranger':
        return [('fastopt', lambda ps: fastopt.ranger(ps, lr)), ('fastai', lambda ps: fa.ranger(ps, lr))]
    raise ValueError(name)

TORCH_KINDS = {'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}
OPTIMIZERS = list(FLOOR_PASSES)

def make_params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in ps: p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return ps

def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()

def timed(fn, device) -> float:
    sync(device); t = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t

def copy_bandwidth(n_floats:int, device:str, repeats:int) -> float:
    "Bytes per second of `dst.copy_(src)` on `n_floats` floats (one read and one write per element)"
    src, dst = torch.randn(n_floats, device=device), torch.empty(n_floats, device=device)
    dst.copy_(src)
    t = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(max(repeats, 5)))
    return 2 * 4 * n_floats / t

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

def first_step_seconds(factory, shapes, device) -> float:
    "fastopt's first step on fresh parameters, with an empty kernel cache: compilation included"
    import fastopt.engine.cpu as cpu, fastopt.engine.plan as plan
    saved_env, saved = os.environ.get('FASTOPT_CACHE_DIR'), (dict(cpu._loaded), dict(plan._kernels))
    with tempfile.TemporaryDirectory() as d:
        os.environ['FASTOPT_CACHE_DIR'] = d
        cpu._loaded.clear(); plan._kernels.clear()
        try:
            ps = make_params(shapes, device)
            opt = factory(ps)
            return timed(opt.step, device)
        finally:
            if saved_env is None: os.environ.pop('FASTOPT_CACHE_DIR', None)
            else: os.environ['FASTOPT_CACHE_DIR'] = saved_env
            for cache, old in zip((cpu._loaded, plan._kernels), saved): cache.clear(); cache.update(old)

def bench_set(set_name, shapes, optimizers, device, repeats, warmup):
    "Rows of results for one parameter set"
    n_floats = sum(torch.Size(s).numel() for s in shapes)
    bandwidth = copy_bandwidth(n_floats, device, repeats)
    contenders = [('AdamW', 'torch fused', implementations('AdamW')[-1][1])]   # the baseline of every ratio
    for name in optimizers:
        contenders += [(name, label, f) for label, f in implementations(name) if (name, label) != contenders[0][:2]]
    runs = []
    for name, label, factory in contenders:
        ps = make_params(shapes, device)
        try: opt = factory(ps)
        except Exception as e:   # e.g. a fused kernel torch lacks on this device
            print(f'  skipped {name} {label}: {type(e).__name__}: {e}', file=sys.stderr); continue
        first = first_step_seconds(factory, shapes, device) if label == 'fastopt' else None
        for _ in range(warmup): opt.step()
        runs.append(dict(set=set_name, opt=name, impl=label, step=opt.step, times=[], first=first, device=device,
                         peak=peak_extra_bytes(opt.step, device), opt_obj=opt))
    rng = random.Random(0)
    for _ in range(repeats):   # interleaved: one step of each implementation per round, in a shuffled order
        for r in rng.sample(runs, len(runs)): r['times'].append(timed(r['step'], device))
    base_times = runs[0]['times']   # torch fused AdamW, timed in the same rounds
    base = statistics.median(base_times)
    rows = []
    for r in runs:
        if r is runs[0] and 'AdamW' not in optimizers: continue
        med = statistics.median(r['times'])
        # the ratio within each round, then the median: robust to the machine's load drifting between rounds
        vs_fused = statistics.median(t / b for t, b in zip(r['times'], base_times))
        floor = FLOOR_PASSES[r['opt']] * 4 * n_floats / bandwidth
        extra = ''
        if r['impl'] == 'fastopt':
            o = r['opt_obj']
            counts = getattr(o, 'execution_counts', None) or getattr(getattr(o, 'opt', None), 'execution_counts', {})
            if counts.get('per_param'): extra = f" ({counts['per_param']} param-steps per-parameter)"
        rows.append(dict(set=r['set'], opt=r['opt'], impl=r['impl'] + extra, ms=med * 1e3, vs_fused=vs_fused,
                         vs_floor=med / floor, peak_mb=None if r['peak'] is None else r['peak'] / 2**20,
                         first_s=r['first']))
    info = dict(set=set_name, tensors=len(shapes), floats=n_floats, bandwidth=bandwidth, fused_ms=base * 1e3)
    for r in runs: r.clear()
    gc.collect()
    return info, rows

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
          f"{platform.machine()}, {torch.get_num_threads()} threads" + (f", GPU: {gpu}" if gpu else ", CPU") + "\n")
    all_info, all_rows = [], []
    for s in args.sets:
        shapes = [tuple(max(1, int(d / args.scale)) if i == 0 else d for i, d in enumerate(sh)) for sh in SETS[s]]
        info, rows = bench_set(s, shapes, args.optimizers, args.device, args.repeats, args.warmup)
        all_info.append(info); all_rows += rows
    print('| set | tensors | floats | copy bandwidth | torch fused AdamW |\n|---|---:|---:|---:|---:|')
    for i in all_info:
        print(f"| {i['set']} | {i['tensors']} | {i['floats']:,} | {i['bandwidth']/1e9:.1f} GB/s | {i['fused_ms']:.2f} ms |")
    print('\n| set | optimizer | implementation | median ms | × torch fused AdamW | × bandwidth floor '
          '| peak extra MiB | first step s |\n|---|---|---|---:|---:|---:|---:|---:|')
    for r in all_rows:
        peak = '' if r['peak_mb'] is None else f"{r['peak_mb']:.1f}"
        first = '' if r['first_s'] is None else f"{r['first_s']:.2f}"
        print(f"| {r['set']} | {r['opt']} | {r['impl']} | {r['ms']:.2f} | {r['vs_fused']:.2f} | {r['vs_floor']:.2f} "
              f"| {peak} | {first} |")
    return all_info, all_rows

if __name__ == '__main__': main()
