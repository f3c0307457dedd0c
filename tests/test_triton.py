"""The Triton emitter (issue 15, items 1 and 2), run by Triton's interpreter on CPU tensors
(`FASTOPT_FUSED_BACKEND=triton`): fused-Triton against the per-parameter reference for every optimizer (float32
within 1e-6 relative, float64, bfloat16/float16 parameters with each `update_rounding` and state dtype within the
ulp rules of test_engine_dtypes), stochastic rounding bit-equal to the C kernel's, one launch per bucket and phase,
no recompilation when a hyper-parameter changes, the per-tensor sums handed to a hook between phases, the planner's
backend choice, and a library that imports and runs without triton. Strict `execution='fused'` everywhere, so a
silent fallback fails."""
import subprocess, sys
from pathlib import Path
import pytest, torch
import fastopt.engine.plan as plan
import fastopt.engine.triton as ftriton
from fastopt import Adam, Lamb
from fastopt.engine.storage import roundings
from helpers import make_groups, run
from test_engine_dtypes import (OPTIMIZERS, SHAPES3, STATE_DTYPES, LOW, Agreement, fused_and_reference, check_storage,
                                rel_for, grad_stream, _flat, _inner)
from test_foreach import OPTIMIZERS as FOREACH_OPTIMIZERS, _relative_error

pytest.importorskip('triton')

@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv('FASTOPT_FUSED_BACKEND', 'triton')

def _backends(opt) -> set:
    return {b.backend for gp in _inner(opt)._planner.plans.values() for b in gp.buckets}

def _buckets(opt) -> list:
    return [b for gp in _inner(opt)._planner.plans.values() for b in gp.buckets]

def _fused_and_reference(make, n_steps, dtype=torch.float32, shapes=SHAPES3):
    groups, ref_groups = make_groups(shapes, dtype=dtype), make_groups(shapes, dtype=dtype)
    opt, ref = make(groups), make(ref_groups)
    opt.execution, ref.execution = 'fused', 'per_param'
    grads = grad_stream(groups, n_steps)
    run(opt, groups, grads); run(ref, ref_groups, grads)
    assert _inner(opt).execution_counts == {'fused': n_steps * len(_flat(groups)), 'per_param': 0}
    assert _backends(opt) == {'triton'}
    return opt, ref, groups, ref_groups

def _assert_states_agree(opt, ref, groups, ref_groups, tol):
    for p, q in zip(_flat(groups), _flat(ref_groups)):
        a, b = _inner(opt).state[p], _inner(ref).state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                if a[k].numel(): assert ((a[k] - b[k]).abs().max() <= tol * b[k].abs().max().clamp(min=1)).item(), k
            else: assert a[k] == b[k], k

@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_triton_matches_per_parameter(name):
    opt, ref, groups, ref_groups = _fused_and_reference(OPTIMIZERS[name], 4)
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6
    _assert_states_agree(opt, ref, groups, ref_groups, 1e-6)

@pytest.mark.parametrize('name', ['Adam', 'Lamb', 'exotic'])
def test_triton_matches_per_parameter_over_30_steps(name):
    "A longer run; 'exotic' uses where, comparisons, clamp, softplus, sign, pow, lerp and per-tensor numbers"
    opt, ref, groups, ref_groups = _fused_and_reference(FOREACH_OPTIMIZERS[name], 30)
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6

@pytest.mark.parametrize('state_dtype', list(STATE_DTYPES.values()), ids=list(STATE_DTYPES))
@pytest.mark.parametrize('rounding', roundings)
@pytest.mark.parametrize('dtype', LOW, ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', ['Adam', 'Lamb'])
def test_triton_matches_per_parameter_in_low_precision(name, dtype, rounding, state_dtype):
    agree = Agreement()
    fused, _, fg, _ = fused_and_reference(OPTIMIZERS[name], SHAPES3, 3, dtype, rounding, state_dtype, agree=agree,
                                          rel=rel_for(name))
    assert agree.fraction >= 0.99, f'only {agree.fraction:.4%} of {agree.total} stored 16-bit values agree exactly'
    check_storage(fused, fg, dtype, rounding, state_dtype, 3)
    assert _backends(fused) == {'triton'}

@pytest.mark.parametrize('dtype', LOW, ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', [n for n in OPTIMIZERS if n not in ('Adam', 'Lamb')])
def test_triton_matches_per_parameter_in_low_precision_with_each_rounding(name, dtype):
    "Every other optimizer: 16-bit parameters and state, each rounding"
    for rounding in roundings:
        agree = Agreement()
        fused, _, fg, _ = fused_and_reference(OPTIMIZERS[name], SHAPES3, 3, dtype, rounding, agree=agree,
                                              rel=rel_for(name))
        assert agree.fraction >= 0.99 and _backends(fused) == {'triton'}, rounding
        check_storage(fused, fg, dtype, rounding, None, 3)

def _run_with(backend, monkeypatch, make, dtype, rounding, n_steps, state_dtype=None):
    monkeypatch.setenv('FASTOPT_FUSED_BACKEND', backend)
    groups = make_groups(SHAPES3, dtype=dtype)
    opt = make(groups)
    opt.execution, opt.update_rounding, opt.state_dtype, opt.seed = 'fused', rounding, state_dtype, 77
    run(opt, groups, grad_stream(groups, n_steps))
    assert _backends(opt) == {'triton' if backend == 'triton' else 'cpu'}
    return opt, groups

@pytest.mark.parametrize('dtype', LOW, ids=['bf16', 'fp16'])
def test_stochastic_rounding_is_bit_equal_to_the_c_kernel(dtype, monkeypatch):
    "Same seed, same counter-based generator: the Triton and C kernels store the same bits, state included"
    for make, state_dtype in ((OPTIMIZERS['SGD'], None), (OPTIMIZERS['Adam'], torch.bfloat16)):
        tri, tg = _run_with('triton', monkeypatch, make, dtype, 'stochastic', 5, state_dtype)
        c, cg = _run_with('cpu', monkeypatch, make, dtype, 'stochastic', 5, state_dtype)
        for p, q in zip(_flat(tg), _flat(cg)):
            assert torch.equal(p.view(torch.int16), q.view(torch.int16))
            for k, v in tri.state[p].items():
                if isinstance(v, torch.Tensor): assert torch.equal(v, c.state[q][k]), k
                else: assert v == c.state[q][k]

@pytest.mark.parametrize('dtype', LOW, ids=['bf16', 'fp16'])
def test_stochastic_rounding_is_storage_round_stochastic(dtype):
    "The kernel stores round_stochastic(w, dtype, key) bit for bit, w the float32 update (two operations: no FMA)"
    from fastopt import SGD
    from fastopt.engine.storage import round_stochastic, rounding_key
    ps = [torch.randn(3000).to(dtype), torch.randn(()).to(dtype), torch.randn(0).to(dtype), torch.randn(5, 7).to(dtype)]
    opt = SGD(ps, lr=1e-3, execution='fused', update_rounding='stochastic', seed=11)
    for step in (1, 2):
        for p in ps: p.grad = torch.randn(p.shape).to(dtype)
        w = [p.float() + p.grad.float() * torch.tensor(-1e-3, dtype=torch.float32) for p in ps]
        opt.step()
        for i, (p, x) in enumerate(zip(ps, w)):
            want = round_stochastic(x, dtype, rounding_key(11, step, i))
            assert torch.equal(p.view(torch.int16), want.view(torch.int16)), (step, i)
    assert opt.execution_counts == {'fused': 8, 'per_param': 0} and _backends(opt) == {'triton'}

def test_kahan_and_nearest_are_bit_equal_to_the_c_kernel_for_adam(monkeypatch):
    for rounding in ('kahan', 'nearest'):
        tri, tg = _run_with('triton', monkeypatch, OPTIMIZERS['Adam'], torch.bfloat16, rounding, 4)
        c, cg = _run_with('cpu', monkeypatch, OPTIMIZERS['Adam'], torch.bfloat16, rounding, 4)
        for p, q in zip(_flat(tg), _flat(cg)):
            assert torch.equal(p.view(torch.int16), q.view(torch.int16))
            if rounding == 'kahan': assert torch.equal(tri.state[p]['kahan_comp'], c.state[q]['kahan_comp'])

def test_unaligned_tensors():
    "Parameters and state at addresses that are not multiples of 16 bytes run the kernels built without that hint"
    def make_unaligned(dtype):
        return [[torch.randn(s[0] * s[1] + 1 if len(s) == 2 else s[0] + 1).to(dtype)[1:].view(s) for s in g]
                for g in [[(5, 4), (33,)], [(7,)]]]
    for dtype, state_dtype in ((torch.float32, None), (torch.bfloat16, torch.bfloat16)):
        groups = make_unaligned(dtype)
        ref_groups = [[p.clone() for p in g] for g in groups]
        assert all(p.data_ptr() % 16 for p in _flat(groups))
        opt, ref = Adam(groups, lr=1e-2, state_dtype=state_dtype), Adam(ref_groups, lr=1e-2, state_dtype=state_dtype)
        opt.execution, ref.execution = 'fused', 'per_param'
        grads = grad_stream(groups, 3)
        run(opt, groups, grads); run(ref, ref_groups, grads)
        assert _backends(opt) == {'triton'} and opt.execution_counts['per_param'] == 0
        rel = 1e-6 if dtype == torch.float32 else 1e-2
        assert _relative_error(_flat(groups), _flat(ref_groups)) < rel

def test_float64_and_complex():
    for dtype, tol in ((torch.float64, 1e-13), (torch.complex64, 1e-6)):
        for name in ('Adam', 'Lamb'):
            opt, ref, groups, ref_groups = _fused_and_reference(OPTIMIZERS[name], 5, dtype, [[(5, 4), (3,), ()], [(0,), (7,)]])
            assert _relative_error(_flat(groups), _flat(ref_groups)) < tol, (dtype, name)

def test_one_launch_per_bucket_and_phase():
    "Lamb has two phases (its norms must be complete before the update): at most groups x phases launches a step"
    groups = make_groups(SHAPES3)
    opt = Lamb(groups, lr=1e-2, wd=1e-2, execution='fused')
    grads = grad_stream(groups, 4)
    run(opt, groups, grads[:1])
    before = ftriton.TritonRunner.launches
    run(opt, groups, grads[1:])
    per_step = (ftriton.TritonRunner.launches - before) / 3
    assert per_step == sum(len(b.fn.phases) for b in _buckets(opt)) <= len(groups) * 2
    assert {len(b.fn.phases) for b in _buckets(opt)} == {2}

def test_hyper_parameters_are_kernel_arguments():
    "A scheduler changing lr (and any numeric hyper-parameter) neither replans nor compiles another kernel"
    groups, ref_groups = make_groups(SHAPES3), make_groups(SHAPES3)
    opt, ref = Adam(groups, lr=1e-2, execution='fused'), Adam(ref_groups, lr=1e-2, execution='per_param')
    grads = grad_stream(groups, 6)
    run(opt, groups, grads[:2]); run(ref, ref_groups, grads[:2])
    compiled, builds = len(ftriton._compiled), opt._planner.builds
    for i in range(2, 6):
        for o in (opt, ref): o.set_hyper('lr', 1e-2 / (i + 1)); o.set_hyper('mom', 0.9 - 0.01 * i)
        run(opt, groups, grads[i:i + 1]); run(ref, ref_groups, grads[i:i + 1])
    assert len(ftriton._compiled) == compiled and opt._planner.builds == builds
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6

def test_the_per_tensor_sums_reach_a_hook_between_phases():
    "LAMB's squared norms, one row per tensor, before the phase that reads them; what the hook writes is used"
    shapes = [[(5, 4), (3,), (0,)]]
    groups, ref_groups = make_groups(shapes), make_groups(shapes)
    opt, ref = Lamb(groups, lr=1e-2, execution='fused'), Lamb(ref_groups, lr=1e-2, execution='per_param')
    seen = []
    grads = grad_stream(groups, 4)
    run(opt, groups, grads[:2]); run(ref, ref_groups, grads[:2])   # the state exists: the plan stays
    (b,) = _buckets(opt)
    b.fn.between_phases = lambda sums: seen.append(sums.clone())
    weights = [p.detach().clone() for p in _flat(groups)]
    run(opt, groups, grads[2:3]); run(ref, ref_groups, grads[2:3])
    assert len(seen) == 1 and seen[0].shape == (3, len(b.prog.sums)) and seen[0].dtype == torch.float64
    squares = torch.tensor([float((w.double() ** 2).sum()) for w in weights], dtype=torch.float64)
    assert any(torch.allclose(seen[0][:, j], squares, rtol=1e-6) for j in range(seen[0].shape[1]))
    assert _relative_error(_flat(groups), _flat(ref_groups)) < 1e-6
    b.fn.between_phases = lambda sums: sums[:, 0].mul_(4.)   # a changed norm changes the trust ratio
    run(opt, groups, grads[3:]); run(ref, ref_groups, grads[3:])
    assert _relative_error(_flat(groups), _flat(ref_groups)) > 1e-4

def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert plan.backend_for('auto', cpu) == 'triton' and plan.backend_for('fused', cpu) == 'triton'
    assert plan.backend_for('foreach', cpu) == 'foreach'
    assert plan.backend_for('auto', cuda) == 'triton' and plan.backend_for('foreach', cuda) == 'foreach'
    monkeypatch.delenv('FASTOPT_FUSED_BACKEND')
    assert plan.backend_for('auto', cpu) == 'cpu'
    monkeypatch.setattr(ftriton, 'triton_available', lambda: False)
    assert plan.backend_for('auto', cuda) == 'foreach' and plan.backend_for('fused', cuda) == 'foreach'

def test_an_unknown_backend_name_is_a_value_error_before_anything_changes(monkeypatch):
    groups = make_groups(SHAPES3)
    opt = Adam(groups, lr=1e-3)
    run(opt, groups, grad_stream(groups, 1))
    before = [p.detach().clone() for p in _flat(groups)]
    monkeypatch.setenv('FASTOPT_FUSED_BACKEND', 'trition')
    with pytest.raises(ValueError, match='FASTOPT_FUSED_BACKEND'): run(opt, groups, grad_stream(groups, 1))
    assert all(torch.equal(p, q) for p, q in zip(_flat(groups), before))

def test_the_environment_variable_is_read_when_a_step_is_planned(monkeypatch):
    groups = make_groups(SHAPES3)
    opt = Adam(groups, lr=1e-3, execution='fused')
    grads = grad_stream(groups, 3)
    run(opt, groups, grads[:1]); assert _backends(opt) == {'triton'}
    monkeypatch.delenv('FASTOPT_FUSED_BACKEND')
    run(opt, groups, grads[1:2]); assert _backends(opt) == {'cpu'}
    monkeypatch.setenv('FASTOPT_FUSED_BACKEND', 'triton')
    run(opt, groups, grads[2:]); assert _backends(opt) == {'triton'}

def test_gpu_kernel_sources_are_generated():  # (the next test compiles them when triton's NVIDIA backend is there)
    "The GPU form of a kernel: libdevice's transcendental functions and tl.sum (no GPU here to compile it on)"
    groups = make_groups(SHAPES3)
    opt = FOREACH_OPTIMIZERS['exotic'](groups); opt.execution = 'fused'
    run(opt, groups, grad_stream(groups, 1))
    b = _buckets(opt)[0]
    srcs = [s for _, s in ftriton.kernel_sources(b.prog, b.layout, 'gpu')]
    assert srcs and any('libdevice.pow' in s and 'libdevice.log1p' in s for s in srcs) and any('tl.sum(' in s for s in srcs)
    for s in srcs: compile(s, '<kernel>', 'exec')

def _nvidia_backend() -> bool:
    try: from triton.backends import backends
    except ImportError: return False
    return 'nvidia' in backends

@pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend is not installed")
def test_gpu_kernels_compile_for_an_h100(monkeypatch, tmp_path):
    "Every GPU kernel of a few layouts compiles to a cubin for sm_90 (no GPU needed: Triton cross-compiles)"
    import triton
    from triton.backends.compiler import GPUTarget
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path))
    cases = [('exotic', torch.float32, 'nearest', None), ('Lamb', torch.bfloat16, 'stochastic', None),
             ('Lamb', torch.float16, 'stochastic', torch.float32), ('Adam', torch.bfloat16, 'kahan', torch.bfloat16),
             ('Lamb', torch.float64, 'nearest', None)]
    for name, dtype, rounding, state_dtype in cases:
        groups = make_groups([[(5, 4), (3,)]], dtype=dtype)
        opt = FOREACH_OPTIMIZERS[name](groups)
        opt.execution, opt.update_rounding, opt.state_dtype = 'fused', rounding, state_dtype
        run(opt, groups, grad_stream(groups, 2))
        for b in _buckets(opt):
            for aligned in (False, True):
                for _, src in ftriton.kernel_sources(b.prog, b.layout, 'gpu', aligned):
                    fn = ftriton.compile_phase(src, 'gpu')
                    k = triton.compile(triton.compiler.ASTSource(fn, ftriton.ARGUMENT_TYPES, constexprs={'BLOCK': 1024}),
                                       target=GPUTarget('cuda', 90, 32), options=dict(enable_fp_fusion=False))
                    assert k.asm['cubin'], (name, dtype, rounding)
                    if name == 'Adam': assert ('ld.global.v4' in k.asm['ptx']) == aligned   # vector loads when aligned

_WITHOUT_TRITON = r'''
import sys, os, torch
sys.modules['triton'] = None   # as if it were not installed
os.environ['FASTOPT_FUSED_BACKEND'] = 'triton'
import fastopt
from fastopt import Adam
import fastopt.engine.plan as plan
assert not plan.has_emitter(torch.device('cuda')) and plan.backend_for('auto', torch.device('cuda')) == 'foreach'
p = torch.zeros(5, requires_grad=True); p.grad = torch.ones(5)
opt = Adam([p], lr=1e-2)   # 'auto': the bucket cannot be built, the parameter goes per parameter, with the reason
opt.step()
assert opt.execution_counts['per_param'] == 1 and any('triton' in r for r in opt.fallback_reasons), opt.fallback_reasons
opt = Adam([p], lr=1e-2, execution='fused')
try: opt.step()
except Exception as e: assert 'triton' in str(e), e
else: raise AssertionError('fused must raise without triton')
del os.environ['FASTOPT_FUSED_BACKEND']
opt = Adam([p], lr=1e-2, execution='fused'); opt.step()   # the C kernel needs no triton
print('ok')
'''

def test_the_library_imports_and_runs_without_triton():
    root = Path(__file__).parents[1]
    res = subprocess.run([sys.executable, '-c', _WITHOUT_TRITON], capture_output=True, text=True, cwd=root,
                         env={**__import__('os').environ, 'PYTHONPATH': str(root)}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-3000:]
