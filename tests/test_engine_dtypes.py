"""Low-precision storage in the step engine (issue 14, "What proves it"): bfloat16/float16 parameters, mixed
parameter/gradient/state dtypes, the three `update_rounding` modes and `state_dtype`.

The backbone is differential: the fused kernels (strict `execution='fused'`, so a silent fallback fails) against
the per-parameter reference, over many steps, three groups, odd sizes, a 0-d and an empty tensor. After every
step, stored 16-bit values must agree within one unit in the last place (ulp) of their dtype, and at least 99% of
them exactly; float32 state within 1e-6 relative. (The reference then continues from the fused run's values: see
`fused_and_reference` for why, and `test_the_kernel_computes_each_float32_operation_as_torch_does`.) Then the semantics the reference itself must have: Kahan summation tracks a
float64 run where rounding to nearest stalls, stochastic rounding is unbiased and reproducible, a run resumed in
a fresh process is bit-exact, state dicts round-trip, and settings are validated and never hyper-parameters.
"""
import io, subprocess, sys
from pathlib import Path
import pytest, torch
import fastopt
from fastopt import Optimizer, SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb, ranger
from fastopt.callbacks import weight_decay, average_grad, momentum_step
from fastopt.engine.storage import roundings
from helpers import make_groups, clone_groups, run

LOW = (torch.bfloat16, torch.float16)
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# three groups: odd sizes, an empty and a 0-d tensor, and one large enough for torch's vectorised loops
SHAPES3 = [[(5, 4), (4,), (0,)], [(3, 3, 2), (7,), ()], [(61, 67), (33,)]]

OPTIMIZERS = {
    'SGD':      lambda ps: SGD(ps, lr=slice(1e-2, 5e-2), mom=0.9, wd=1e-2),
    'RMSProp':  lambda ps: RMSProp(ps, lr=1e-2, mom=0.9, wd=1e-2),
    'Adam':     lambda ps: Adam(ps, lr=slice(1e-3, 1e-2)),
    'RAdam':    lambda ps: RAdam(ps, lr=1e-2, wd=1e-2),      # rectification switches on at step 6
    'QHAdam':   lambda ps: QHAdam(ps, lr=1e-2, wd=1e-2),
    'Larc':     lambda ps: Larc(ps, lr=5e-2, wd=1e-3),
    'Lamb':     lambda ps: Lamb(ps, lr=1e-2, wd=1e-2),
    'ranger':   lambda ps: ranger(ps, lr=1e-2, k=3),           # Lookahead: slow weights in the parameter dtype
    'composed': lambda ps: Optimizer(ps, [weight_decay, average_grad, momentum_step], lr=5e-2, wd=1e-2),
}
STATE_DTYPES = {'state_param': None, 'state_fp32': FP32, 'state_bf16': BF16}

# ---- comparing stored values ----

def ulps(a:torch.Tensor, b:torch.Tensor) -> torch.Tensor:
    "Distance between two bfloat16 (or two float16) tensors in units in the last place (+0 and -0 coincide)"
    assert a.dtype == b.dtype and a.dtype in LOW
    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()

def ulp_of(t:torch.Tensor) -> torch.Tensor:
    "The spacing of 16-bit floats at each element of `t` (bfloat16 or float16), as float32"
    mag = t.view(torch.int16) & 0x7FFF
    return (mag + 1).view(t.dtype).float() - mag.view(t.dtype).float()

REDUCING = ('Larc', 'Lamb')   # their updates scale by norms of whole tensors

def rel_for(name:str) -> float:
    """The tolerance of values relative to their tensor's largest: 1e-6, but 1e-5 where torch sums LARC's and LAMB's
    norms in float32 (the kernel in float64), and for Lookahead, whose synchronisation halves the difference of two
    weights (a fast weight that rounded the other way, by one of its ulps, moves the result by half of that)"""
    return 1e-5 if name in REDUCING + ('ranger',) else 1e-6

class Agreement:
    """Compares tensors of a fused run with the reference's and counts the 16-bit values that agree exactly.

    A 16-bit value agrees when it is within one ulp of its dtype, or within `rel` (1e-6) of the tensor's largest
    value (at least 1, the order of the weights and gradients): the tolerance of float32 values, which applies to a 16-bit value computed by cancellation (a moving
    average near zero), where a last-bit difference of the float32 operands is many ulps of the small result.

    With `at_scale`, a 16-bit value may also differ by two ulps of the tensor's largest value: what two runs that
    are not resynchronised after each step (see `fused_and_reference`) show after many steps, where a value that
    rounded the other way once has followed its own path since."""
    def __init__(self, at_scale:bool=False): self.exact, self.total, self.at_scale = 0, 0, at_scale
    def _tolerance(self, ref, rel):
        scale = ref.abs().max().float().clamp(min=1)   # the operands (weights, gradients) are of order 1
        tol = rel * scale
        return torch.maximum(tol, 2 * ulp_of(ref.abs().max().reshape(1))[0]) if self.at_scale else tol
    def __call__(self, a, b, what:str, rel:float=1e-6):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not a.numel(): return
        if a.dtype in LOW:
            d = ulps(a, b)
            bad = (d > 1) & ((a.float() - b.float()).abs() > self._tolerance(b, rel))
            assert not bad.any(), f"{what}: {int(bad.sum())} values differ by more than one ulp (max {int(d.max())})"
            self.exact += int((d == 0).sum()); self.total += a.numel()
        else:
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()   # operands are of order 1
            assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
    def compensation(self, a, b, pa, pb, what:str, rel:float=1e-6):
        """Kahan buffers hold what rounding lost, the bits of the float32 value below the parameter's precision: a
        last-bit difference in float32 arithmetic shows there, and where the parameter rounded the other way its
        buffer makes up for it. So parameter + buffer agree, within 1/256 of an ulp of the parameter or the
        tolerance of the parameter's values (with `at_scale`, one ulp or two at the tensor's scale); buffers are not
        counted as exact or not."""
        assert a.dtype == b.dtype == pa.dtype and a.shape == b.shape
        if not a.numel(): return
        err = ((pa.float() + a.float()) - (pb.float() + b.float())).abs()
        bad = (err > ulp_of(pb) / (1 if self.at_scale else 256)) & (err > self._tolerance(pb, rel))
        assert not bad.any(), f"{what}: {int(bad.sum())} parameter + buffer values differ"
    @property
    def fraction(self) -> float: return self.exact / self.total if self.total else 1.0

def _flat(groups): return [p for g in groups for p in g]

def _inner(opt): return getattr(opt, 'opt', opt)

def compare_runs(fused, ref, fused_groups, ref_groups, agree:Agreement, rel:float=1e-6, when:str=''):
    "Parameters, every state entry and (for a Lookahead) the slow weights of two optimizers agree"
    for i, (p, q) in enumerate(zip(_flat(fused_groups), _flat(ref_groups))):
        agree(p.detach(), q.detach(), f'{when}parameter {i}', rel)
        a, b = fused.state[p], ref.state[q]
        assert sorted(a) == sorted(b), f'{when}parameter {i}: state {sorted(a)} vs {sorted(b)}'
        for k in a:
            what = f'{when}state {k!r} of parameter {i}'
            if k == 'kahan_comp': agree.compensation(a[k], b[k], p.detach(), q.detach(), what, rel)
            elif isinstance(a[k], torch.Tensor): agree(a[k], b[k], what, rel)
            else: assert a[k] == b[k], f'{what}: {a[k]!r} vs {b[k]!r}'
    if hasattr(fused, 'slow_weights'):
        for i, (s, t) in enumerate(zip(_flat(fused.slow_weights), _flat(ref.slow_weights))):
            agree(s, t, f'{when}slow weight {i}', rel)

def grad_stream(groups, n_steps:int, dtype=None, seed:int=1):
    "Per step, one gradient per parameter (drawn in float32, then stored in `dtype`, default the parameter's)"
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(dtype or p.dtype) for p in _flat(groups)] for _ in range(n_steps)]

@torch.no_grad()
def _resync(fused, ref, fused_groups, ref_groups):
    "Give the reference the fused run's stored values, so that the next step starts from the same bits"
    for p, q in zip(_flat(fused_groups), _flat(ref_groups)):
        q.copy_(p)
        for k, v in fused.state[p].items():
            if isinstance(v, torch.Tensor): ref.state[q][k].copy_(v)
            else: ref.state[q][k] = v
    if hasattr(fused, 'slow_weights'):
        for p, q in zip(_flat(fused_groups), _flat(ref_groups)): ref._slow[q].copy_(fused._slow[p])

def fused_and_reference(make, shapes, n_steps:int, dtype, rounding='kahan', state_dtype=None, grad_dtype=None,
                        agree=None, rel:float=1e-6, seed:int=0, before_step=None):
    """The same optimizer run fused (strictly) and per parameter, on the same parameters and gradients.

    With `agree`, the two are compared after every step, and the reference then continues from the fused run's
    stored values: each step is checked on its own. (torch's float32 arithmetic is not the kernel's in the last
    bit: torch's CPU kernels contract `a + alpha*b` into fused multiply-adds and, with MKL, compute `sqrt` within
    one ulp, not correctly rounded. Without resynchronising, a 16-bit value that rounds the other way at one step
    makes the runs drift apart.) `before_step(i, opt)`, if given, is called on both optimizers before step `i`."""
    groups = make_groups(shapes, dtype=dtype, seed=seed)
    fused_groups, ref_groups = groups, clone_groups(groups)
    if grad_dtype not in (None, dtype):   # torch asks for a gradient of another dtype to be declared
        for p in _flat(fused_groups) + _flat(ref_groups): p.grad_dtype = grad_dtype
    fused, ref = make(fused_groups), make(ref_groups)
    for o, ex in ((fused, 'fused'), (ref, 'per_param')):   # settings are attributes, set after construction
        o.execution, o.update_rounding, o.state_dtype, o.seed = ex, rounding, state_dtype, 1234
    grads = grad_stream(fused_groups, n_steps, grad_dtype)
    for i, step_grads in enumerate(grads):
        if before_step is not None: before_step(i, fused); before_step(i, ref)
        run(fused, fused_groups, [step_grads]); run(ref, ref_groups, [step_grads])
        if agree is not None:
            compare_runs(fused, ref, fused_groups, ref_groups, agree, rel, f'step {i + 1}: ')
            _resync(fused, ref, fused_groups, ref_groups)
    assert _inner(fused).execution_counts == {'fused': n_steps * len(_flat(groups)), 'per_param': 0}
    return fused, ref, fused_groups, ref_groups

def check_storage(opt, groups, dtype, rounding, state_dtype, n_steps):
    "Parameters keep their dtype, floating state is in `state_dtype` (default the parameter's), with the rounding's own entries"
    for p in _flat(groups):
        st = opt.state[p]
        assert p.dtype == dtype
        for k, v in st.items():
            if not isinstance(v, torch.Tensor): continue
            want = p.dtype if k == 'kahan_comp' else (state_dtype or p.dtype)
            assert v.dtype == want, f'state {k!r} is {v.dtype}, expected {want}'
        low = dtype in LOW
        assert ('kahan_comp' in st) == (low and rounding == 'kahan')
        assert st.get('rounding_step') == (n_steps if low and rounding == 'stochastic' else None)

# ---- a. fused against per-parameter, every optimizer, dtype, rounding and state dtype ----

def _moved(groups, dtype) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(_flat(groups), _flat(make_groups(SHAPES3, dtype=dtype))))

@pytest.mark.parametrize('state_dtype', list(STATE_DTYPES.values()), ids=list(STATE_DTYPES))
@pytest.mark.parametrize('rounding', roundings)
@pytest.mark.parametrize('dtype', LOW, ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_fused_matches_per_parameter_in_low_precision(name, dtype, rounding, state_dtype):
    agree = Agreement()
    fused, _, fg, _ = fused_and_reference(OPTIMIZERS[name], SHAPES3, 100, dtype, rounding, state_dtype, agree=agree,
                                          rel=rel_for(name))   # RAdam rectifies from step 6
    assert agree.fraction >= 0.99, f'only {agree.fraction:.4%} of {agree.total} stored 16-bit values agree exactly'
    check_storage(fused, fg, dtype, rounding, state_dtype, 100)
    assert _moved(fg, dtype), 'the run must have moved the weights'

@pytest.mark.parametrize('name', ['Adam', 'Lamb', 'ranger'])
def test_fused_and_per_parameter_runs_stay_together_over_100_bf16_steps(name, rounding='stochastic'):
    # not resynchronised: the two runs may part where a value rounds the other way, but only by ulps of the
    # tensor's scale, and almost all values stay bit for bit the same
    fused, ref, fg, rg = fused_and_reference(OPTIMIZERS[name], SHAPES3, 100, BF16, rounding)
    agree = Agreement(at_scale=True)
    compare_runs(fused, ref, fg, rg, agree, rel=1e-4)
    assert agree.fraction >= 0.95, f'only {agree.fraction:.4%} of {agree.total} stored 16-bit values agree exactly'

# ---- the float32 arithmetic that 16-bit storage rounds ----

def _op(f):
    def cb(p, **kwargs): f(p.data, p.grad.data)
    return cb

PRIMITIVES = {   # one element-wise operation the built-in callbacks use, applied to a float32 parameter
    'mul-then-add': lambda p, g: p.mul_(0.9).add_(g),
    'div':          lambda p, g: p.div_(g.abs() + 0.5),
    'add-alpha':    lambda p, g: p.add_(g, alpha=-0.1),
    'addcmul':      lambda p, g: p.addcmul_(g, g, value=0.01),
    'addcdiv':      lambda p, g: p.addcdiv_(g, g.abs() + 0.5, value=-0.1),
    'lerp':         lambda p, g: p.lerp_(g, 0.1),
    'sqrt':         lambda p, g: p.copy_((g * g + p * p).sqrt()),
}

@pytest.mark.parametrize('op', list(PRIMITIVES))
def test_the_kernel_computes_each_float32_operation_within_one_ulp_of_torch(op):
    # The kernel rounds each operation once, in IEEE arithmetic without contraction. torch's vectorised CPU loops
    # may contract a*b + c into a fused multiply-add (add with alpha, lerp, addcmul) and use a sqrt that is not
    # correctly rounded, so the two agree to one unit in the last place, not bit for bit (see 08_cpu); 16-bit
    # storage then rounds the same way in all but the rare near-tie cases the comparisons above count.
    # 4099 elements: torch's vectorised loops and their tail
    runs = []
    for ex in ('fused', 'per_param'):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(4099, generator=gen); p.grad = torch.randn(4099, generator=gen)
        opt = Optimizer([p], [_op(PRIMITIVES[op])]); opt.execution = ex
        opt.step(); runs.append(p)
    gen = torch.Generator().manual_seed(0)
    p0, g = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen)
    scale = p0.abs() + g.abs() + runs[1].abs()   # a contracted a*b + c differs by an ulp of its operands, not its result
    worst = ((runs[0] - runs[1]).abs() / scale).max().item()
    assert worst <= 2**-23, f'{op}: results differ by {worst / 2**-23:.1f} units in the last place of their operands'
    assert opt.execution_counts['per_param'] == 1

# ---- f. mixed dtypes ----

MIXED = {   # parameter dtype, gradient dtype, state_dtype
    'bf16-params-fp32-grads':  (BF16, FP32, None),
    'fp16-params-fp32-grads':  (FP16, FP32, FP32),
    'bf16-params-fp16-state':  (BF16, BF16, FP16),
    'fp32-params-bf16-state':  (FP32, FP32, BF16),
    'fp32-params-fp16-state':  (FP32, FP32, FP16),
    'fp64-params-fp32-state':  (FP64, FP64, FP32),
    'fp64-params-bf16-state':  (FP64, FP64, BF16),
}

@pytest.mark.parametrize('mix', list(MIXED))
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_mixed_dtypes_fused_matches_per_parameter(name, mix):
    dtype, grad_dtype, state_dtype = MIXED[mix]
    rounding = 'stochastic' if dtype == FP16 else 'kahan'
    agree = Agreement()
    fused, _, fg, _ = fused_and_reference(OPTIMIZERS[name], SHAPES3, 30, dtype, rounding, state_dtype, grad_dtype,
                                          agree=agree, rel=rel_for(name))
    assert agree.fraction >= 0.99, f'only {agree.fraction:.4%} of {agree.total} stored 16-bit values agree exactly'
    check_storage(fused, fg, dtype, rounding, state_dtype, 30)
    for p in _flat(fg): assert p.grad.dtype == grad_dtype   # the gradients were not converted in place
    assert _moved(fg, dtype)

def test_fp64_parameters_compute_in_fp64_whatever_the_state_dtype():
    # an update of 1e-12 relative is lost in float32 arithmetic but kept in float64: with float32 state, a float64
    # parameter still computes in float64 (only the stored state is rounded)
    for ex in ('fused', 'per_param'):
        p = torch.ones(7, dtype=FP64)
        opt = SGD([p], lr=1e-12, mom=0.5); opt.state_dtype = FP32; opt.execution = ex
        p.grad = torch.ones_like(p); opt.step()
        assert opt.state[p]['grad_avg'].dtype == FP32
        assert (p == 1 - 1e-12).all(), ex

# ---- b. against a float64 run of the same algorithm ----

BF16_ULP_1 = 2.0**-7   # the bfloat16 ulp in [1, 2): every weight of these runs stays there

@pytest.mark.parametrize('execution', ['fused', 'per_param'])
def test_kahan_tracks_a_float64_run_where_nearest_stalls_sgd(execution):
    # 1,000 steps of 1e-4 on weights in [1, 1.5): each step is 1/78 of a bfloat16 ulp
    start = 1 + (torch.arange(256, dtype=FP64) % 64) * BF16_ULP_1   # bfloat16 numbers
    g = torch.tensor(-0.1, dtype=BF16)
    exact = start - 1000 * 1e-3 * g.double()                 # the float64 run (no rounding worth the name)
    res = {}
    for rounding in ('kahan', 'nearest', 'stochastic'):
        p = start.to(BF16)
        opt = SGD([p], lr=1e-3); opt.update_rounding, opt.execution = rounding, execution
        for _ in range(1000): p.grad = g.expand(p.shape).clone(); opt.step()
        res[rounding] = (p.double() - exact) / BF16_ULP_1   # error in bfloat16 ulps
    assert ((exact - start) / BF16_ULP_1).min() > 12   # the float64 run moved every weight by 12.8 ulps
    assert res['kahan'].abs().max() <= 1, res['kahan']
    assert torch.equal(res['nearest'], (start - exact) / BF16_ULP_1)   # 'nearest' never moved a weight
    assert res['stochastic'].mean().abs() < 1.5, res['stochastic']  # unbiased: its random walk averages out

@pytest.mark.parametrize('state_dtype', [FP32, None], ids=['state_fp32', 'state_bf16'])
def test_kahan_tracks_a_float64_run_where_nearest_stalls_adam(state_dtype):
    # Adam with lr=1e-4 over 1,000 steps: each step about 1/100 of a bfloat16 ulp; gradients with a sign per
    # element so that the weights drift (by ~8 ulps) rather than random-walk
    gen = torch.Generator().manual_seed(0)
    start = (1.25 + 0.25 * torch.rand(300, generator=gen, dtype=FP64)).to(BF16).double()
    sign = torch.where(torch.rand(300, generator=gen) < 0.5, -1.0, 1.0).double()
    grads = [(sign * (0.5 + torch.rand(300, generator=gen, dtype=FP64))).to(BF16) for _ in range(1000)]
    def train(dtype, rounding='nearest'):
        p = start.to(dtype, copy=True)
        opt = Adam([p], lr=1e-4, wd=0.); opt.update_rounding = rounding
        if dtype == BF16: opt.state_dtype = state_dtype
        for g in grads: p.grad = g.to(dtype); opt.step()
        return p.double()
    exact = train(FP64)
    assert ((exact - start).abs() / BF16_ULP_1).median() > 5   # the float64 run moved by several ulps
    kahan = (train(BF16, 'kahan') - exact) / BF16_ULP_1
    nearest = (train(BF16, 'nearest') - exact) / BF16_ULP_1
    assert kahan.abs().max() <= 1, kahan.abs().max()   # observed: 0.4 (float32 state), 0.7 (bfloat16 state)
    assert torch.equal(nearest, (start - exact) / BF16_ULP_1)   # 'nearest' stalled: no weight moved
    assert nearest.abs().median() > 5

# ---- c. stochastic rounding: unbiased, seeded, reproducible ----

def _one_stochastic_step(seed:int, start, g, execution='fused'):
    p = start.clone()
    p.grad_dtype = g.dtype   # a float32 gradient for a bfloat16 parameter (torch asks for this to be declared)
    opt = SGD([p], lr=1.); opt.update_rounding, opt.seed, opt.execution = 'stochastic', seed, execution
    p.grad = g.clone(); opt.step()
    assert opt.state[p]['rounding_step'] == 1
    return p

def test_stochastic_rounding_is_unbiased_in_expectation():
    n, n_seeds = 2000, 400
    gen = torch.Generator().manual_seed(0)
    start = (1 + torch.randint(0, 100, (n,), generator=gen) * BF16_ULP_1).to(BF16)
    g = -0.45 * torch.rand(n, generator=gen) * BF16_ULP_1   # each weight moves up by less than half an ulp (lr=1)
    w = start.float() - g                                   # the float32 value to round
    q = ((w - start.float()) / BF16_ULP_1).double()         # where it lies between its two bfloat16 neighbours
    assert 0 < q.min() and q.max() < 0.5
    runs = torch.stack([_one_stochastic_step(s, start, g).float() for s in range(n_seeds)])
    assert set(((runs - start.float()) / BF16_ULP_1).unique().tolist()) == {0.0, 1.0}   # one of the two neighbours
    mean = runs.double().mean(0)
    sd = (q * (1 - q) / n_seeds).sqrt() * BF16_ULP_1   # standard deviation of each element's mean over the seeds
    assert ((mean - w.double()).abs() <= 5 * sd + 1e-9).all()
    # over all elements: the mean error is within 5 standard deviations of zero (~0.001 ulp)
    assert abs((mean - w.double()).mean()) <= 5 * (sd**2).sum().sqrt() / n
    # rounding to nearest has the bias this test detects: it loses `frac` every time
    nearest = start.float() - w
    assert abs(nearest.double().mean()) > 50 * 5 * (sd**2).sum().sqrt() / n
    # the per-parameter reference draws the same numbers
    for s in (0, 1, 77): assert torch.equal(_one_stochastic_step(s, start, g, 'per_param').float(), runs[s])

def test_stochastic_rounding_depends_on_the_seed_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    start = (1 + torch.randint(0, 100, (1000,), generator=gen) * BF16_ULP_1).to(BF16)
    g = -torch.rand(1000, generator=gen) * BF16_ULP_1
    a, b, a2 = (_one_stochastic_step(s, start, g) for s in (0, 1, 0))
    assert torch.equal(a, a2)                 # same seed, same rounding
    assert (a != b).float().mean() > 0.2      # another seed, other roundings for many elements
    # two identical parameters of one optimizer draw independent numbers (the key includes the parameter)
    p, q = start.clone(), start.clone()
    p.grad_dtype = q.grad_dtype = g.dtype
    opt = SGD([p, q], lr=1.); opt.update_rounding = 'stochastic'
    p.grad, q.grad = g.clone(), g.clone(); opt.step()
    assert not torch.equal(p, q)

@pytest.mark.parametrize('execution', ['fused', 'per_param'])
def test_same_seed_gives_bit_identical_runs(execution):
    results = []
    for seed in (5, 5, 6):
        groups = make_groups(SHAPES3, dtype=BF16)
        opt = OPTIMIZERS['Adam'](groups)
        opt.update_rounding, opt.seed, opt.execution = 'stochastic', seed, execution
        run(opt, groups, grad_stream(groups, 15))
        results.append(_flat(groups))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    assert not all(torch.equal(a, b) for a, b in zip(results[0], results[2]))

# ---- d. resume in a fresh process, bit-exact ----

import engine_resume_worker as W
WORKER = Path(__file__).parent/'engine_resume_worker.py'

def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    expected = {}
    for config in W.CONFIGS:
        m, opt = W.build(config)
        W.train(m, opt, range(W.FIRST))
        torch.save(W.checkpoint(m, opt), tmp_path/f'{config}.ckpt')
        W.train(m, opt, range(W.FIRST, W.FIRST + W.REST))
        expected[config] = W.checkpoint(m, opt)
    res = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *W.CONFIGS], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for config in W.CONFIGS:
        got = torch.load(tmp_path/f'{config}.resumed', weights_only=True)
        exp, start = expected[config], W.build(config)[0].state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in exp['model'].items()), 'the run must have trained'
        for k, v in exp['model'].items():
            assert got['model'][k].dtype == v.dtype and torch.equal(got['model'][k], v), f'{config}: {k} differs'
        assert_same_state_dict(got['opt'], exp['opt'], config)

def assert_same_state_dict(got, exp, what=''):
    "Two optimizer state dicts hold the same values, tensors bit for bit and in the same dtype"
    assert got.keys() == exp.keys(), what
    assert got['state'].keys() == exp['state'].keys(), what
    for i, s in exp['state'].items():
        assert got['state'][i].keys() == s.keys(), f'{what}: parameter {i}'
        for k, v in s.items():
            g = got['state'][i][k]
            if isinstance(v, torch.Tensor): assert g.dtype == v.dtype and torch.equal(g, v), f'{what}: {k} of {i}'
            else: assert g == v, f'{what}: {k} of {i}'
    for a, b in zip(_flat(got.get('slow_weights') or []), _flat(exp.get('slow_weights') or [])):
        assert a.dtype == b.dtype and torch.equal(a, b), f'{what}: slow weights'
    assert got.get('count') == exp.get('count'), what

# ---- e. state dicts: round trip, conversion, refusal ----

def _trained(make, dtype, rounding='kahan', state_dtype=None, n_steps=5, execution='auto'):
    groups = make_groups(SHAPES3, dtype=dtype)
    opt = make(groups)
    opt.update_rounding, opt.state_dtype, opt.execution = rounding, state_dtype, execution
    run(opt, groups, grad_stream(groups, n_steps))
    return opt, groups

def _saved_and_loaded(sd):
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf, weights_only=True)

@pytest.mark.parametrize('name,rounding', [('Adam', 'kahan'), ('ranger', 'kahan'), ('ranger', 'stochastic'),
                                           ('Lamb', 'stochastic')])
def test_bf16_state_and_kahan_buffers_round_trip_exactly(name, rounding):
    opt, groups = _trained(OPTIMIZERS[name], BF16, rounding)
    sd = opt.state_dict()
    kinds = {k: v.dtype for s in sd['state'].values() for k, v in s.items() if isinstance(v, torch.Tensor)}
    assert kinds.get('grad_avg') == BF16 and (kinds.get('kahan_comp') == BF16 or rounding != 'kahan')
    back = _saved_and_loaded(sd)
    assert_same_state_dict(back, sd)
    # loaded into a fresh optimizer with the same settings, it continues exactly as the original does
    groups2 = clone_groups(groups)
    opt2 = OPTIMIZERS[name](groups2); opt2.update_rounding = rounding
    opt2.load_state_dict(back)
    assert_same_state_dict(opt2.state_dict(), sd)
    grads = grad_stream(groups, 5, seed=9)
    for a, b in zip(run(opt, groups, grads), run(opt2, groups2, grads)): assert torch.equal(a, b)

def test_loading_into_another_state_dtype_converts():
    opt, groups = _trained(OPTIMIZERS['Adam'], BF16, 'kahan')   # bfloat16 state
    sd = _saved_and_loaded(opt.state_dict())
    results = []
    for ex in ('fused', 'per_param'):
        groups2 = clone_groups(groups)
        wide = OPTIMIZERS['Adam'](groups2); wide.state_dtype = FP32; wide.execution = ex
        wide.load_state_dict(sd)
        for i, p in enumerate(_flat(groups2)):
            if not wide.state[p]: continue
            st, saved = wide.state[p], sd['state'][i]
            for k in ('grad_avg', 'sqr_avg'):
                assert st[k].dtype == FP32 and torch.equal(st[k], saved[k].float())   # cast, exactly
            assert st['kahan_comp'].dtype == BF16 and torch.equal(st['kahan_comp'], saved['kahan_comp'])
        results.append(run(wide, groups2, grad_stream(groups2, 5, seed=9)))
    agree = Agreement()
    for a, b in zip(*results): agree(a, b, 'parameter')
    assert agree.fraction >= 0.99
    # and the other way: float32 state into an optimizer that keeps bfloat16 state, rounded to nearest
    opt, groups = _trained(OPTIMIZERS['Adam'], FP32)
    sd = _saved_and_loaded(opt.state_dict())
    narrow = OPTIMIZERS['Adam'](clone_groups(groups)); narrow.state_dtype = BF16
    narrow.load_state_dict(sd)
    for i, p in enumerate(_flat(narrow.param_lists)):
        if narrow.state[p]:
            assert narrow.state[p]['grad_avg'].dtype == BF16
            assert torch.equal(narrow.state[p]['grad_avg'], sd['state'][i]['grad_avg'].to(BF16))

@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_a_kahan_buffer_is_refused_by_another_rounding(rounding):
    opt, groups = _trained(OPTIMIZERS['Adam'], BF16, 'kahan')
    sd = _saved_and_loaded(opt.state_dict())
    other, _ = _trained(OPTIMIZERS['Adam'], BF16, rounding, n_steps=2)
    before = _saved_and_loaded(other.state_dict())
    with pytest.raises(ValueError, match=r"Kahan compensation.*update_rounding='kahan'"): other.load_state_dict(sd)
    assert_same_state_dict(other.state_dict(), before)   # nothing changed
    # nor does a float32 copy of the model take it (its parameters take no rounding)
    wide = OPTIMIZERS['Adam']([[p.float() for p in g] for g in groups])
    with pytest.raises(ValueError, match='Kahan compensation'): wide.load_state_dict(sd)
    assert not any(wide.state.values())

def test_an_optimizer_loads_its_own_state_dict_after_its_rounding_changed():
    # 'kahan' leaves a compensation buffer in the state; after switching to 'nearest' the optimizer's own
    # state dict must still load into it (a checkpoint of a run cannot be refused by that same run)
    opt, groups = _trained(OPTIMIZERS['Adam'], BF16, 'kahan')
    opt.update_rounding = 'nearest'
    run(opt, groups, grad_stream(groups, 2, seed=5))
    opt.load_state_dict(_saved_and_loaded(opt.state_dict()))

@pytest.mark.parametrize('execution', ['auto', 'per_param'])
@pytest.mark.parametrize('dtype', [FP32, BF16], ids=['fp32', 'bf16'])
def test_loading_a_state_dict_after_steps_takes_effect(dtype, execution):
    # rewind a run to a checkpoint in the same optimizer (as fastai's lr_find and learn.load do) and replay it:
    # the same weights and state, bit for bit, as the run that was never rewound
    groups, whole = make_groups(SHAPES3, dtype=dtype), make_groups(SHAPES3, dtype=dtype)
    opt, ref = OPTIMIZERS['Adam'](groups), OPTIMIZERS['Adam'](whole)
    opt.execution = ref.execution = execution
    grads = grad_stream(groups, 6)
    run(ref, whole, grads)
    run(opt, groups, grads[:3])
    ckpt, weights = _saved_and_loaded(opt.state_dict()), [p.clone() for p in _flat(groups)]
    run(opt, groups, grads[3:])
    with torch.no_grad():
        for p, w in zip(_flat(groups), weights): p.copy_(w)
    opt.load_state_dict(ckpt)
    run(opt, groups, grads[3:])
    for a, b in zip(_flat(groups), _flat(whole)): assert torch.equal(a, b)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())

# ---- settings changed between steps ----

@pytest.mark.parametrize('first,then', [('kahan', 'nearest'), ('kahan', 'stochastic'), ('nearest', 'kahan'),
                                        ('stochastic', 'nearest')])
def test_changing_update_rounding_between_steps_fused_matches_per_parameter(first, then):
    def switch(i, opt):
        if i == 4: opt.update_rounding = then
    agree = Agreement()
    fused, _, fg, _ = fused_and_reference(OPTIMIZERS['Adam'], SHAPES3, 8, BF16, first, agree=agree, before_step=switch)
    assert fused.update_rounding == then and agree.fraction >= 0.99

@pytest.mark.parametrize('first,then', [(None, FP32), (FP32, BF16), (FP32, None)], ids=['to-fp32', 'fp32-to-bf16',
                                                                                     'fp32-to-param'])
def test_changing_state_dtype_between_steps_fused_matches_per_parameter(first, then):
    def switch(i, opt):
        if i == 4:
            opt.state_dtype = then   # converts the existing state now
            for st in opt.state.values():
                assert all(v.dtype == (then or BF16) for k, v in st.items() if isinstance(v, torch.Tensor))
    agree = Agreement()
    fused_and_reference(OPTIMIZERS['Adam'], SHAPES3, 8, BF16, 'nearest', first, agree=agree, before_step=switch)
    assert agree.fraction >= 0.99

def test_changing_state_dtype_of_one_element_state_between_steps():
    # one-element state whose value is the same number in bfloat16 (1.5): a plan that compares state rows by value
    # would keep its float32 kernel and write float32 numbers into the converted bfloat16 buffers
    out = []
    for ex in ('fused', 'per_param'):
        ps = [torch.tensor(1.0), torch.tensor([2.0])]
        opt = SGD(ps, lr=0.5, mom=0.5); opt.execution = ex
        for i in range(5):
            if i == 2: opt.state_dtype = BF16   # grad_avg is 1.5 here
            for p in ps: p.grad = torch.ones_like(p)
            opt.step()
        out.append([p.item() for p in ps] + [opt.state[p]['grad_avg'].item() for p in ps])
    assert out[0] == out[1] == [-3.03125, -2.03125, 1.9375, 1.9375]

@pytest.mark.parametrize('rounding', roundings)
def test_a_parameter_that_joins_later_in_a_stateless_low_precision_run(rounding):
    # plain SGD keeps no state of its own: only the rounding's entries ('kahan_comp', 'rounding_step'), which a
    # parameter stepped for the first time does not have yet
    runs = []
    for ex in ('fused', 'per_param'):
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(5, generator=gen).to(BF16), torch.randn(3, generator=gen).to(BF16)
        opt = SGD([a, b], lr=0.1); opt.execution, opt.update_rounding = ex, rounding
        a.grad = torch.full_like(a, 1e-3); opt.step()              # b has no gradient yet (frozen, say)
        a.grad, b.grad = torch.full_like(a, 1e-3), torch.full_like(b, 1e-3); opt.step()
        runs.append((a, b))
    for x, y in zip(*runs): assert torch.equal(x, y)

# ---- g. settings are validated, and are not hyper-parameters ----

BAD = {
    'execution': ['fast', 'foreach_typo', None],
    'update_rounding': ['round', 'Kahan', None, 1],
    'state_dtype': [torch.int8, torch.complex64, 'bfloat16', torch.bool],
    'seed': [-1, 1.5, True, '3'],
    'nonfinite_grads': ['ignore'],
}
CHOICES = {
    'execution': ['auto', 'fused', 'per_param'],
    'update_rounding': list(roundings),
    'state_dtype': ['None', 'torch.float32', 'torch.float64', 'torch.bfloat16', 'torch.float16'],
    'seed': ['integer >= 0'],
    'nonfinite_grads': ['propagate', 'raise'],
}

@pytest.mark.parametrize('setting', list(BAD))
def test_bad_settings_are_value_errors_naming_the_choices(setting):
    groups = make_groups(SHAPES3, dtype=BF16)
    opt = OPTIMIZERS['Adam'](groups)
    run(opt, groups, grad_stream(groups, 2))
    before, state = getattr(opt, setting), _saved_and_loaded(opt.state_dict())
    for bad in BAD[setting]:
        with pytest.raises(ValueError) as e: setattr(opt, setting, bad)
        msg = str(e.value)
        assert setting in msg and repr(bad) in msg, msg
        for c in CHOICES[setting]: assert c in msg, f'{msg!r} does not name {c!r}'
        assert getattr(opt, setting) == before   # unchanged, and so is the state
        assert_same_state_dict(opt.state_dict(), state)
        with pytest.raises(ValueError, match=setting):   # the constructor checks them too
            Optimizer(make_groups(SHAPES3), [weight_decay], lr=0.1, **{setting: bad})

def test_settings_are_not_hyper_parameters():
    groups = make_groups(SHAPES3, dtype=BF16)
    for opt in (OPTIMIZERS['Adam'](groups), OPTIMIZERS['ranger'](clone_groups(groups))):
        opt.execution, opt.update_rounding, opt.state_dtype, opt.seed = 'per_param', 'stochastic', FP32, 3
        assert (_inner(opt).update_rounding, _inner(opt).state_dtype, _inner(opt).seed) == ('stochastic', FP32, 3)
        places = [*opt.hypers, *opt.param_groups, opt.defaults, *opt.state_dict()['param_groups']]
        for name in fastopt.optimizer.settings:
            assert all(name not in d for d in places), name
            with pytest.raises(ValueError, match='unknown hyper-parameter'): opt.set_hyper(name, 'nearest')
        run(opt, opt.param_lists, grad_stream(opt.param_lists, 1))
        assert all(name not in d for d in opt.state_dict()['param_groups'] for name in fastopt.optimizer.settings)

MODERN = ['Lion', 'Adan', 'ADOPT', 'AdEMAMix', 'StableAdamW', 'ScheduleFreeAdamW', 'ScheduleFreeSGD', 'Adafactor', 'Muon',
          'MuonAdamW']

@pytest.mark.parametrize('name', MODERN)
def test_every_modern_factory_takes_the_settings(name):
    # as the fastai set does (`opt_func=partial(Lion, state_dtype=torch.bfloat16)` in a Learner), checked as there
    import fastopt.modern
    factory = getattr(fastopt.modern, name)
    params = [torch.randn(4, 3, requires_grad=True)]
    if name == 'MuonAdamW': params = [{'params': params, 'use_muon': True}]
    make = lambda **kw: factory(params, lr=1e-3, **kw)
    opt = make(execution='per_param', update_rounding='stochastic', state_dtype=BF16, seed=7, nonfinite_grads='raise')
    inner = _inner(opt)
    assert (inner.execution, inner.update_rounding, inner.state_dtype, inner.seed, inner.nonfinite_grads) == \
           ('per_param', 'stochastic', BF16, 7, 'raise')
    assert all(s not in g for g in opt.param_groups for s in fastopt.optimizer.settings)
    with pytest.raises(ValueError, match='state_dtype'): make(state_dtype='bfloat16')
    with pytest.raises(TypeError, match=f'{name}.*unexpected keyword'): make(rounding='kahan')
