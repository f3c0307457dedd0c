"""8-bit optimizer state (`state_dtype='int8'`, issue 17): block-wise codes with one float32 scale per 256 values.

Differential: the fused C kernel (strict) and the foreach backend against the per-parameter reference, which
dequantises into float32 working copies, runs the callbacks and quantises back (engine.storage). After every step
the stored codes must be equal, or one code apart in a tiny fraction of values (a float32 value on a midpoint of
the map, where the kernel's and torch's last bit differ), scales within 1e-6; the reference then continues from
the fused run's stored values, so each step is checked on its own. Then what the setting promises: the map's error
bound against float64, state bytes per parameter, state dicts through `torch.load(weights_only=True)` and a
bit-exact resume in a fresh process, conversion and refusal, training loss, and bad input.

Run as a script, this file is the fresh process of the resume test: `python tests/test_int8_state.py DIR NAME`.
"""
import copy, subprocess, sys
from pathlib import Path
import pytest, torch
from torch import nn
import fastopt
from fastopt import Optimizer, SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb, ranger
from fastopt.modern import Lion, AdEMAMix
from fastopt.engine.storage import (INT8_MAP, INT8_BLOCK, INT8_MIN_NUMEL, quantize_blockwise, dequantize_blockwise,
                                    uniform, round_stochastic)

# three groups, odd sizes: some quantised (>= 4,096 values), some kept in float32, a 0-d and an empty tensor
SHAPES3 = [[(70, 61), (5,), ()], [(4099,), (3, 3)], [(64, 65), (0,), (4095,)]]
OPTIMIZERS = {
    'Adam':     lambda ps: Adam(ps, lr=slice(1e-3, 1e-2), wd=1e-2),
    'SGD':      lambda ps: SGD(ps, lr=1e-2, mom=0.9, wd=1e-2),
    'RMSProp':  lambda ps: RMSProp(ps, lr=1e-3, mom=0.9),
    'RAdam':    lambda ps: RAdam(ps, lr=1e-2, wd=1e-2),   # rectification switches on at step 6
    'QHAdam':   lambda ps: QHAdam(ps, lr=1e-2),
    'Lamb':     lambda ps: Lamb(ps, lr=1e-2, wd=1e-2),
    'Larc':     lambda ps: Larc(ps, lr=5e-2, wd=1e-3),
    'ranger':   lambda ps: ranger(ps, lr=1e-2, k=3),
    'Lion':     lambda ps: Lion(ps, lr=1e-3, wd=1e-2),
    'AdEMAMix': lambda ps: AdEMAMix(ps, lr=1e-3),
}

def groups_of(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).requires_grad_() for s in shp] for shp in shapes]

def flat(groups): return [p for g in groups for p in g]

def set_grads(groups, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in flat(groups): p.grad = torch.randn(p.shape, generator=g)

def make(name, groups, execution, state_dtype='int8'):
    opt = OPTIMIZERS[name](groups)
    opt.state_dtype, opt.execution = state_dtype, execution
    return opt

def inner(opt): return getattr(opt, 'opt', opt)

def resync(src, dst, src_groups, dst_groups):
    "Give `dst` the stored values of `src` (parameters, codes, scales, numbers, Lookahead's slow weights)"
    with torch.no_grad():
        for p, q in zip(flat(src_groups), flat(dst_groups)):
            q.copy_(p)
            s, d = inner(src).state[p], inner(dst).state[q]
            assert set(s) == set(d), (set(s), set(d))
            for k, v in s.items():
                if isinstance(v, torch.Tensor): d[k].copy_(v)
                elif isinstance(v, dict): d[k] = {kk: vv.clone() for kk, vv in v.items()}
                else: d[k] = v
            if hasattr(src, '_slow'): dst._slow[q].copy_(src._slow[p])

class Codes:
    "Counts the 8-bit codes of two runs that differ (by one code at most)"
    def __init__(self): self.diff, self.total = 0, 0
    def __call__(self, a, b, what):
        assert a.dtype == b.dtype == torch.int8 and a.shape == b.shape, what
        d = (a.int() - b.int()).abs()
        assert d.max().item() <= 1 if d.numel() else True, f"{what}: codes differ by {d.max().item()}"
        self.diff += int((d > 0).sum()); self.total += d.numel()

def compare(fused, ref, fg, rg, codes, rel, what):
    for p, q in zip(flat(fg), flat(rg)):
        scale = max(1.0, q.abs().max().item()) if q.numel() else 1.0
        torch.testing.assert_close(p, q, rtol=0, atol=rel * scale, msg=lambda m: f"{what} parameter: {m}")
        s, d = inner(fused).state[p], inner(ref).state[q]
        assert set(s) == set(d), f"{what}: state {sorted(s)} vs {sorted(d)}"
        quantised = set(s.get('int8_scales', {}))
        assert quantised == ({k for k, v in s.items() if isinstance(v, torch.Tensor) and v.shape == p.shape
                              and k not in ('kahan_comp',)} if p.numel() >= INT8_MIN_NUMEL else set()), what
        for k in quantised:
            codes(s[k], d[k], f"{what} {k}")
            torch.testing.assert_close(s['int8_scales'][k], d['int8_scales'][k], rtol=1e-6, atol=1e-12)
        for k, v in s.items():
            if k in quantised or k == 'int8_scales': continue
            if isinstance(v, torch.Tensor):
                assert v.dtype == d[k].dtype == torch.float32, f"{what} {k}: {v.dtype}"
                torch.testing.assert_close(v, d[k], rtol=rel, atol=rel * max(1.0, d[k].abs().max().item()) if v.numel() else 0)
            else: assert v == d[k], f"{what} {k}"

@pytest.mark.parametrize('backend', ['fused', 'foreach'])
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_backends_match_the_reference(name, backend):
    "30 steps, 3 groups, odd sizes: codes equal (or one apart in < 0.1% of values), scales and float state to 1e-6"
    fg = groups_of(SHAPES3); rg = [[p.detach().clone().requires_grad_() for p in g] for g in fg]
    fused, ref = make(name, fg, backend), make(name, rg, 'per_param')
    codes, steps = Codes(), 30
    rel = 1e-5 if name in ('Lamb', 'Larc', 'ranger') else 1e-6   # norms summed in another order; Lookahead's halving
    for i in range(steps):
        set_grads(fg, i); set_grads(rg, i)
        fused.step(); ref.step()
        compare(fused, ref, fg, rg, codes, rel, f"{name} {backend} step {i+1}")
        resync(fused, ref, fg, rg)
    assert inner(fused).execution_counts == {'fused': steps * len(flat(fg)), 'per_param': 0}
    assert codes.total > 0 and codes.diff <= 1e-3 * codes.total, f"{codes.diff} of {codes.total} codes differ"
    print(f"{name} {backend}: {codes.diff} of {codes.total} codes differ by one")

def test_quantisation_is_nearest_code_within_the_maps_half_gap():
    "Against float64: each value gets the map value nearest to it (relative to its block's absolute maximum)"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.logspace(-6, 1, 50_000)[torch.randperm(50_000, generator=g)]
    codes, scales = quantize_blockwise(x)
    assert codes.dtype == torch.int8 and scales.shape == (-(-50_000 // INT8_BLOCK),)
    blocks = torch.nn.functional.pad(x.double(), (0, (-50_000) % INT8_BLOCK)).view(-1, INT8_BLOCK)
    assert torch.equal(scales.double(), blocks.abs().amax(1))
    y = (x.double().view(-1) / scales.double().repeat_interleave(INT8_BLOCK)[:50_000])
    m = INT8_MAP.double()
    best = (y[:, None] - m[None]).abs().min(1).values
    got = (y - m[codes.long() + 127]).abs()
    assert (got <= best + 1e-6).all()   # nearest (up to float32's division)
    gaps = (m[1:] - m[:-1])
    assert got.max() <= gaps.max() / 2 + 1e-6
    deq = dequantize_blockwise(codes, scales).double()
    rel = (deq - x.double()).abs() / x.double().abs()
    normal = y.abs() >= 2**-14   # 3 fraction bits: within 1/16 relative; below, evenly spaced 2^-17 of the maximum
    assert normal.float().mean() > 0.3 and rel[normal].max() <= 1/16 + 1e-6
    assert ((deq - x.double()).abs() / scales.double().repeat_interleave(INT8_BLOCK)[:50_000])[~normal].max() <= 2**-18 + 1e-9

def test_uniform_is_made_on_the_tensors_device():
    "Stochastic rounding's random numbers are created where the tensor lives (a CPU arange failed on CUDA)"
    assert uniform(5, 10, 'meta').device.type == 'meta'
    assert round_stochastic(torch.empty(4, device='meta'), torch.float16, 3).device.type == 'meta'
    assert torch.equal(uniform(5, 10, 'cpu'), uniform(5, 10))

def state_bytes(sd) -> int:
    n = 0
    for s in sd['state'].values():
        for v in s.values():
            if isinstance(v, torch.Tensor): n += v.numel() * v.element_size()
            elif isinstance(v, dict): n += sum(t.numel() * t.element_size() for t in v.values())
    return n

def test_adam_state_bytes_per_parameter():
    ps = [torch.randn(s, requires_grad=True) for s in [(512, 256), (100_000,), (300,)]]
    opt = Adam(ps, lr=1e-3, state_dtype='int8')
    for p in ps: p.grad = torch.randn_like(p)
    opt.step()
    per = state_bytes(opt.state_dict()) / sum(p.numel() for p in ps)
    fp32 = Adam([p.detach().clone().requires_grad_() for p in ps], lr=1e-3)
    for p in fp32.param_groups[0]['params']: p.grad = torch.randn_like(p)
    fp32.step()
    print(f"Adam state bytes per parameter: int8 {per:.3f}, fp32 {state_bytes(fp32.state_dict()) / sum(p.numel() for p in ps):.3f}")
    assert per <= 2.1

# ---- state dicts, resume, conversion ----

RESUME = {'Adam': 'fused', 'Lamb': 'foreach', 'ranger': 'per_param', 'Lion': 'fused'}
FIRST, REST = 7, 8

def resume_setup(name):
    groups = groups_of([[(70, 61), (5,)], [(4099,)]], seed=3)
    return groups, make(name, groups, RESUME[name])

def train(opt, groups, steps):
    for i in steps: set_grads(groups, i, seed=7); opt.step()

def resume_in_this_process(d, name):
    groups, opt = resume_setup(name)
    ck = torch.load(Path(d)/f'{name}.ckpt', weights_only=True)
    with torch.no_grad():
        for p, v in zip(flat(groups), ck['params']): p.copy_(v)
    opt.load_state_dict(ck['opt'])
    train(opt, groups, range(FIRST, FIRST + REST))
    torch.save({'params': [p.detach() for p in flat(groups)], 'opt': opt.state_dict()}, Path(d)/f'{name}.resumed')

def assert_same(a, b, where=''):
    if isinstance(a, torch.Tensor): assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a: assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f'{where}[{i}]')
    else: assert a == b, where

def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    whole = {}
    for name in RESUME:
        groups, opt = resume_setup(name)
        train(opt, groups, range(FIRST))
        torch.save({'params': [p.detach() for p in flat(groups)], 'opt': opt.state_dict()}, tmp_path/f'{name}.ckpt')
        train(opt, groups, range(FIRST, FIRST + REST))
        assert any(isinstance(v, torch.Tensor) and v.dtype == torch.int8 for v in inner(opt).state[flat(groups)[0]].values())
        whole[name] = {'params': [p.detach() for p in flat(groups)], 'opt': opt.state_dict()}
    res = subprocess.run([sys.executable, __file__, str(tmp_path), *RESUME], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in RESUME:
        assert_same(torch.load(tmp_path/f'{name}.resumed', weights_only=True), whole[name], name)

def test_setting_and_loading_convert_state():
    "int8 <-> float32 by the setting and by loading into an optimizer with the other setting; a round trip is exact"
    groups = groups_of([[(70, 61), (5,)]])
    opt = make('Adam', groups, 'auto')
    train(opt, groups, range(3))
    p, small = flat(groups)
    st = opt.state[p]
    assert st['grad_avg'].dtype == torch.int8 and opt.state[small]['grad_avg'].dtype == torch.float32
    codes, scales = st['grad_avg'].clone(), st['int8_scales']['grad_avg'].clone()
    sd = opt.state_dict()
    opt.state_dtype = None   # converted to float32 now
    assert st['grad_avg'].dtype == torch.float32 and 'int8_scales' not in st
    assert torch.equal(st['grad_avg'], dequantize_blockwise(codes, scales))
    opt.state_dtype = 'int8'   # and back: the same codes and scales
    assert torch.equal(opt.state[p]['grad_avg'], codes) and torch.equal(opt.state[p]['int8_scales']['grad_avg'], scales)
    fp = make('Adam', groups_of([[(70, 61), (5,)]]), 'auto', state_dtype=None)
    fp.load_state_dict(sd)   # an int8 checkpoint into a float32 optimizer: dequantised
    fp_p = fp.param_groups[0]['params'][0]
    assert fp.state[fp_p]['grad_avg'].dtype == torch.float32 and 'int8_scales' not in fp.state[fp_p]
    assert torch.equal(fp.state[fp_p]['grad_avg'], dequantize_blockwise(codes, scales))
    again = make('Adam', groups_of([[(70, 61), (5,)]]), 'auto')
    again.load_state_dict(fp.state_dict())   # and a float32 checkpoint into an int8 one: quantised, same codes
    q = again.param_groups[0]['params'][0]
    assert torch.equal(again.state[q]['grad_avg'], codes) and torch.equal(again.state[q]['int8_scales']['grad_avg'], scales)

def test_bad_input_changes_nothing():
    groups = groups_of([[(70, 61)]])
    opt = make('Adam', groups, 'auto')
    train(opt, groups, range(2))
    before = copy.deepcopy(opt.state_dict())
    for bad in ['int4', 'uint8', torch.int8, 8]:
        with pytest.raises(ValueError, match="state_dtype must be None, 'int8'"): opt.state_dtype = bad
        with pytest.raises(ValueError, match="state_dtype"): Adam(flat(groups), lr=1e-3, state_dtype=bad)
    assert opt.state_dtype == 'int8'
    sd = copy.deepcopy(before)
    sd['state'][0]['int8_scales']['grad_avg'] = torch.ones(3)   # scales of the wrong shape
    with pytest.raises(ValueError, match='block scales'): opt.load_state_dict(sd)
    sd = copy.deepcopy(before)
    sd['state'][0]['grad_avg'] = sd['state'][0]['grad_avg'].float()   # codes that are not int8
    with pytest.raises(ValueError, match='int8 codes'): opt.load_state_dict(sd)
    assert_same(opt.state_dict(), before)
    # complex parameters keep complex state (stored as their own dtype, never quantised)
    z = torch.randn(80, 60, dtype=torch.complex64, requires_grad=True)
    zopt = Adam([z], lr=1e-3, state_dtype='int8'); z.grad = torch.randn_like(z); zopt.step()
    assert zopt.state[z]['grad_avg'].dtype == torch.complex64 and 'int8_scales' not in zopt.state[z]

def test_with_a_torch_lr_scheduler():
    groups = groups_of([[(70, 61), (5,)]])
    opt = make('Adam', groups, 'fused')
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(5): set_grads(groups, i); opt.step(); sched.step()
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-2 * 0.25)
    assert opt.state[flat(groups)[0]]['grad_avg'].dtype == torch.int8

def digits_loss(state_dtype, steps=150):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16; y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = Adam(model.parameters(), lr=3e-3, state_dtype=state_dtype)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad(); nn.functional.cross_entropy(model(x[idx]), y[idx]).backward(); opt.step()
    with torch.no_grad(): return nn.functional.cross_entropy(model(x), y).item(), opt

def test_adam_int8_trains_as_fp32_on_digits():
    (l8, opt), (l32, _) = digits_loss('int8'), digits_loss(None)
    print(f"digits: loss after 150 steps int8 {l8:.4f}, fp32 {l32:.4f}")
    assert any(v.dtype == torch.int8 for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert abs(l8 - l32) <= 0.02 * l32 + 1e-3

def test_fastai_learner_with_int8_state():
    fastai = pytest.importorskip('fastai.learner')
    from fastai.data.core import DataLoaders
    from fastai.optimizer import OptimWrapper
    from torch.utils.data import TensorDataset, DataLoader
    torch.manual_seed(0)
    x = torch.randn(256, 64); y = (x[:, :10].argmax(1))
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(x, y), batch_size=64))
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    learn = fastai.Learner(dls, model, loss_func=nn.CrossEntropyLoss(),
                           opt_func=lambda ps, lr: Adam(ps, lr=lr, state_dtype='int8'))
    learn.fit(2, lr=1e-2)
    st = learn.opt.state[model[0].weight] if hasattr(learn.opt, 'state') else None
    assert st is not None and st['grad_avg'].dtype == torch.int8

if __name__ == '__main__':   # the fresh process of the resume test
    for name in sys.argv[2:]: resume_in_this_process(sys.argv[1], name)
