"""The fused execution path: it agrees with the per-parameter reference for every optimizer and option, never
rebuilds a kernel when hyper-parameters, freezing or missing gradients change, falls back (or refuses, when
asked to be strict) with a reason, keeps autograd's version counters honest, and allocates nothing per step."""
import os, subprocess, sys
from pathlib import Path
import pytest, torch
from torch import nn
import fastopt, fastopt.engine.plan as plan, fastopt.engine.cpu as cpu
from fastopt import Optimizer, Lookahead, ranger, SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb
from fastopt.callbacks import sgd_step, weight_decay, average_grad
from helpers import SHAPES, make_groups, clone_groups, gradient_stream, run

SHAPES_WITH_EMPTY = [SHAPES[0] + [(0,)], SHAPES[1] + [(300, 70)]]   # 0-d, empty, and a tensor of several chunks
OPTIMIZERS = {
    'SGD':          lambda ps: SGD(ps, lr=slice(1e-3, 1e-2)),
    'SGD-mom-wd':   lambda ps: SGD(ps, lr=1e-2, mom=0.9, wd=1e-2),
    'SGD-l2':       lambda ps: SGD(ps, lr=1e-2, mom=0.9, wd=1e-2, decouple_wd=False),
    'RMSProp':      lambda ps: RMSProp(ps, lr=1e-3),
    'RMSProp-mom':  lambda ps: RMSProp(ps, lr=1e-3, mom=0.9, wd=1e-2),
    'Adam':         lambda ps: Adam(ps, lr=slice(1e-3, 1e-2)),
    'Adam-l2':      lambda ps: Adam(ps, lr=1e-3, wd=1e-2, decouple_wd=False),
    'RAdam':        lambda ps: RAdam(ps, lr=1e-3, wd=1e-2),
    'RAdam-beta':   lambda ps: RAdam(ps, lr=1e-3, beta=5.),
    'QHAdam':       lambda ps: QHAdam(ps, lr=1e-3, wd=1e-2),
    'Larc':         lambda ps: Larc(ps, lr=1e-2, wd=1e-3),
    'Lars':         lambda ps: Larc(ps, lr=1e-2, clip=False, mom=0.),
    'Lamb':         lambda ps: Lamb(ps, lr=1e-3, wd=1e-2),
    'Lookahead':    lambda ps: Lookahead(Adam(ps, lr=1e-3), k=5, alpha=0.6),
    'ranger':       lambda ps: ranger(ps, lr=1e-3),
}

def _relative_error(xs, ys) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item() for x, y in zip(xs, ys) if x.numel())

def _fused_and_reference(make, shapes, n_steps, dtype=torch.float32):
    fused_ps, ref_ps = make_groups(shapes, dtype=dtype), make_groups(shapes, dtype=dtype)
    fused, ref = make(fused_ps), make(ref_ps)
    fused.execution, ref.execution = 'fused', 'per_param'   # 'fused' raises if anything is not fused
    grads = gradient_stream(fused_ps, n_steps)
    return run(fused, fused_ps, grads), run(ref, ref_ps, grads), fused

@pytest.mark.parametrize('name', list(OPTIMIZERS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fused_matches_per_parameter(name, dtype):
    fused, ref, opt = _fused_and_reference(OPTIMIZERS[name], SHAPES_WITH_EMPTY, 100, dtype)
    assert _relative_error(fused, ref) < (1e-6 if dtype == torch.float32 else 1e-13)
    assert opt.execution_counts['per_param'] == 0 and opt.execution_counts['fused'] == 100 * 7

def test_fused_state_matches_per_parameter():
    fused_ps, ref_ps = make_groups(SHAPES), make_groups(SHAPES)
    fused, ref = Lamb(fused_ps, lr=1e-3), Lamb(ref_ps, lr=1e-3)
    ref.execution = 'per_param'
    grads = gradient_stream(fused_ps, 20)
    run(fused, fused_ps, grads); run(ref, ref_ps, grads)
    for p, q in zip([p for g in fused_ps for p in g], [p for g in ref_ps for p in g]):
        a, b = fused.state[p], ref.state[q]
        assert a.keys() == b.keys() and a['step'] == b['step'] == 20
        for k in ('grad_avg', 'sqr_avg'):
            assert a[k].shape == p.shape and a[k].dtype == p.dtype
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6 * b[k].abs().max().item())

def _warm_kernel_count(opt, params, steps, change):
    "Steps `opt`, calling `change(i)` before each; returns the number of known kernels after each step"
    counts = []
    for i in range(steps):
        change(i)
        for p in params: p.grad = torch.randn_like(p)
        opt.step()
        counts.append((len(plan._kernels), cpu.compile_count))
    return counts

def test_scheduled_hyper_parameters_never_rebuild_a_kernel():
    params = [torch.randn(50, 20), torch.randn(20)]
    opt = Adam(params, lr=1e-3, wd=1e-2)
    opt.execution = 'fused'
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=60, cycle_momentum=True)
    seen = set()
    def change(i):
        if i: sched.step()
        opt.set_hyper('wd', 1e-2 * (1 + i % 7))
        seen.add(tuple(opt.param_groups[0][k] for k in ('lr', 'mom', 'wd')))
    counts = _warm_kernel_count(opt, params, 60, change)
    assert len(set(counts[1:])) == 1, counts   # step 1 creates the state; after that nothing is built
    assert len(seen) == 60   # every step had new hyper-parameters

def test_freezing_and_missing_gradients_never_rebuild_a_kernel():
    groups = make_groups([[(6, 3), (3,)], [(4,)], [(5, 5)]])
    fused_groups = clone_groups(groups)
    opt, ref = RAdam(fused_groups, lr=1e-2), RAdam(groups, lr=1e-2)
    ref.execution = 'per_param'
    flat, ref_flat = [p for g in fused_groups for p in g], [p for g in groups for p in g]
    gen = torch.Generator().manual_seed(3)
    counts = []
    for i in range(40):
        for o in (opt, ref): o.freeze_to(i % 3)   # freezing: frozen parameters get no gradient
        skip = i % 4   # and one parameter misses each step, so parameters fall out of step with each other
        for j, (p, q) in enumerate(zip(flat, ref_flat)):
            has_grad = p.requires_grad and j != skip
            p.grad = torch.randn(p.shape, generator=gen) if has_grad else None
            q.grad = p.grad.clone() if has_grad else None
        opt.step(); ref.step()
        counts.append((len(plan._kernels), cpu.compile_count))
    assert len(set(counts[10:])) == 1, counts   # past RAdam's warm-up (rectification off, then on), nothing new
    assert opt.execution_counts['per_param'] == 0
    assert _relative_error(flat, ref_flat) < 1e-6
    assert len({opt.state[p]['step'] for p in flat}) > 1   # the parameters really did fall out of step

def test_a_custom_traceable_callback_is_fused_with_the_builtins():
    def clip_grad_value(p, clip=0.5, **kwargs): p.grad.data.clamp_(-clip, clip)
    make = lambda ps: Optimizer(ps, [clip_grad_value, weight_decay, average_grad, fastopt.momentum_step], lr=0.1, wd=0.1)
    fused, ref, opt = _fused_and_reference(make, SHAPES, 30)
    assert opt.execution_counts['per_param'] == 0
    assert _relative_error(fused, ref) < 1e-6

def test_an_untraceable_callback_runs_per_parameter_and_gives_the_same_result():
    def sign_sgd(p, lr, **kwargs):
        if p.grad.abs().sum() > 0: p.data.add_(p.grad.sign(), alpha=-lr)   # a Python branch on tensor values
    make = lambda ps: Optimizer(ps, [weight_decay, sign_sgd], lr=0.1, wd=0.1)
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, 10)
    opt, ref = make(ours), make(theirs)
    ref.execution = 'per_param'
    for a, b in zip(run(opt, ours, grads), run(ref, theirs, grads)): assert torch.equal(a, b)
    assert opt.execution_counts == {'fused': 0, 'per_param': 50}
    assert any('Python branch on tensor values' in r for r in opt.fallback_reasons)

def test_strict_fused_execution_refuses_and_changes_nothing():
    def noisy(p, lr, **kwargs): p.data.add_(torch.randn_like(p), alpha=-lr)
    params = [torch.randn(3), torch.randn(2, dtype=torch.float16), torch.randn(5).t().contiguous()]
    params.append(torch.empty_strided((3, 4), (1, 3)).normal_())   # a leaf laid out transposed
    for p in params: p.grad = torch.ones_like(p)
    before = [p.clone() for p in params]
    for cbs, expected in (([sgd_step], 'non-contiguous'), ([noisy], 'randn_like')):
        opt = Optimizer(params, cbs, lr=0.1)
        opt.execution = 'fused'
        with pytest.raises(RuntimeError, match=expected): opt.step()
        for p, b in zip(params, before): assert torch.equal(p, b)
        assert not opt.state or all(not s for s in opt.state.values())

def test_unfusable_tensors_fall_back_with_a_reason():
    base = torch.randn(4, 3)
    non_contiguous = torch.empty_strided((3, 4), (1, 3)).copy_(base.t())   # a leaf laid out transposed
    half, double = torch.randn(5).half(), torch.randn(5, dtype=torch.float64)
    params = [non_contiguous, half, double, torch.randn(6)]
    refs = [p.clone() for p in params]
    opt, ref = SGD(params, lr=0.1, mom=0.9), SGD(refs, lr=0.1, mom=0.9)
    ref.execution = 'per_param'
    for _ in range(3):
        for p, q in zip(params, refs): p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
        opt.step(); ref.step()
    for p, q in zip(params, refs): assert torch.allclose(p.float(), q.float(), rtol=1e-6)
    assert opt.execution_counts == {'fused': 9, 'per_param': 3}   # every dtype fuses; the transposed leaf cannot
    assert any('non-contiguous' in r for r in opt.fallback_reasons)

def test_execution_is_validated_and_reaches_wrapped_optimizers():
    params = [torch.randn(3)]
    opt = Adam(params, lr=0.1)
    assert opt.execution == 'auto'
    with pytest.raises(ValueError, match="execution must be one of"): opt.execution = 'fast'
    assert opt.execution == 'auto'
    look = Lookahead(opt)
    look.execution = 'per_param'
    assert opt.execution == 'per_param' == look.execution
    wrapped = fastopt.OptimWrapper(opt=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match='runs its own step'): wrapped.execution = 'fused'

def test_a_fused_step_bumps_version_counters_so_autograd_notices():
    w = nn.Parameter(torch.randn(4))
    opt = Adam([w], lr=0.1)
    opt.execution = 'fused'
    loss = (w * w).sum()   # saves w for the backward pass
    w.grad = torch.ones(4)
    opt.step()
    with pytest.raises(RuntimeError, match='modified by an inplace operation'): loss.backward()

@pytest.mark.parametrize('make', [lambda ps: Lamb(ps, lr=1e-3), lambda ps: Larc(ps, lr=1e-2)])
def test_reductions_do_not_depend_on_the_thread_count(make):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps = make_groups([[(400, 300), (7,)]])
            results.append(run(make(ps), ps, gradient_stream(ps, 5)))
    finally: torch.set_num_threads(threads)
    for a, b in zip(*results): assert torch.equal(a, b)

def test_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv('FASTOPT_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(cpu, '_loaded', {})
    monkeypatch.setattr(plan, '_kernels', {})
    before = cpu.compile_count
    def one_step():
        p = torch.randn(3); p.grad = torch.ones(3)
        opt = QHAdam([p], lr=0.1); opt.execution = 'fused'; opt.step()
    one_step()
    assert cpu.compile_count == before + 1 and len(list((tmp_path/'kernels').glob('*.so'))) == 1
    monkeypatch.setattr(cpu, '_loaded', {})   # a new process: nothing in memory, the library on disk
    monkeypatch.setattr(plan, '_kernels', {})
    one_step()
    assert cpu.compile_count == before + 1

def _peak_extra_bytes(step):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: step()
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes(); peak = max(peak, current)
    return peak

def test_a_fused_step_allocates_no_tensor_memory():
    params = [torch.randn(256, 256) for _ in range(4)]
    for p in params: p.grad = torch.randn_like(p)
    opt = Adam(params, lr=1e-3)
    opt.step()   # creates the state
    theirs = [p.clone().requires_grad_() for p in params]
    for p, q in zip(theirs, params): p.grad = q.grad.clone()
    foreach = torch.optim.AdamW(theirs, lr=1e-3, foreach=True)
    foreach.step()
    assert _peak_extra_bytes(opt.step) == 0 < _peak_extra_bytes(foreach.step)

def test_the_benchmark_runs_and_prints_its_table():
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root/'benchmarks'/'bench_step.py'), '--scale', '1000', '--repeats', '1',
                          '--warmup', '1', '--sets', '200x4K', '200g5x100', 'resnet18-bf16',
                          '--optimizers', 'AdamW', 'AdamW-bf16state', 'ranger'],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    def impls(s): return {tuple(c.strip() for c in l.split('|')[2:4]) for l in out.stdout.splitlines() if l.startswith(f'| {s} |')}
    assert {('AdamW', 'fastopt'), ('AdamW', 'fastai'), ('AdamW', 'torch fused'), ('AdamW', 'torch foreach'),
            ('AdamW-bf16state', 'fastopt'), ('ranger', 'fastopt'), ('ranger', 'fastai')} <= impls('200x4K')
    assert {('AdamW', 'fastopt'), ('AdamW', 'torch fused'), ('ranger', 'fastopt')} <= impls('200g5x100')   # 200 groups
    assert {('AdamW', 'fastopt kahan'), ('AdamW', 'fastopt stochastic'), ('AdamW', 'fastopt nearest'),
            ('AdamW', 'torch fused'), ('AdamW', 'torch foreach'), ('ranger', 'fastopt kahan')} <= impls('resnet18-bf16')
    assert '| 200g5x100 | 200 | 1000 |' in out.stdout and '| bfloat16 |' in out.stdout   # groups, tensors, dtype

def test_an_unwritable_cache_falls_back_to_a_private_one(tmp_path, monkeypatch):
    blocker = tmp_path/'not-a-directory'
    blocker.write_text('')
    monkeypatch.setattr(cpu, '_loaded', {})
    monkeypatch.setattr(cpu, '_failed', {})
    monkeypatch.setattr(plan, '_kernels', {})
    monkeypatch.setenv('FASTOPT_CACHE_DIR', str(blocker))
    ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
    grads = gradient_stream(ours, 3)
    opt, ref = RAdam(ours, lr=1e-2), RAdam(theirs, lr=1e-2)
    opt.execution, ref.execution = 'fused', 'per_param'
    assert _relative_error(run(opt, ours, grads), run(ref, theirs, grads)) < 1e-6

def test_without_a_compiler_the_optimizer_falls_back_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, '_loaded', {})
    monkeypatch.setattr(cpu, '_failed', {})
    monkeypatch.setattr(plan, '_kernels', {})
    calls = []
    real_run = cpu.subprocess.run
    def counting_run(args, *a, **k):
        calls.append(args[0]); return real_run(args, *a, **k)
    monkeypatch.setattr(cpu.subprocess, 'run', counting_run)
    for setting in ({'FASTOPT_CACHE_DIR': str(tmp_path/'cache'), 'PATH': ''},):
        for k, v in setting.items(): monkeypatch.setenv(k, v)
        ours, theirs = make_groups(SHAPES), make_groups(SHAPES)
        grads = gradient_stream(ours, 3)
        opt, ref = RAdam(ours, lr=1e-2), RAdam(theirs, lr=1e-2)
        ref.execution = 'per_param'
        for a, b in zip(run(opt, ours, grads), run(ref, theirs, grads)): assert torch.equal(a, b)
        assert opt.execution_counts['fused'] == 0
        assert any('no C compiler' in r for r in opt.fallback_reasons), opt.fallback_reasons
    assert calls.count('gcc') <= 2   # one failed build per program (RAdam's two phases), not one per step
