"""Step time of Adam with 8-bit state (`state_dtype='int8'`) against float32 state, fastopt's fused CPU kernel.

4 tensors of 4M floats; the two optimizers step in turn (interleaved repetitions, so both see the same machine
load), and the medians are compared. Usage: `python benchmarks/bench_int8.py [--reps N] [--numel N] [--threads N]`
"""
import argparse, statistics, time
import torch
import fastopt

def setup(state_dtype, numel, n=4):
    torch.manual_seed(0)
    ps = [torch.randn(numel, requires_grad=True) for _ in range(n)]
    for p in ps: p.grad = torch.randn_like(p)
    opt = fastopt.Adam(ps, lr=1e-3, state_dtype=state_dtype, execution='fused')
    for _ in range(3): opt.step()   # state created, kernel built and cached
    return opt

def timed(opt) -> float:
    t = time.perf_counter(); opt.step(); return time.perf_counter() - t

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=30)
    ap.add_argument('--numel', type=int, default=4 * 2**20)
    ap.add_argument('--threads', type=int, default=0)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    opts = {'fp32': setup(None, a.numel), 'int8': setup('int8', a.numel)}
    times = {k: [] for k in opts}
    for _ in range(a.reps):
        for k, o in opts.items(): times[k].append(timed(o))
    med = {k: statistics.median(v) for k, v in times.items()}
    b = {k: sum(t.numel() * t.element_size() for s in o.state.values() for t in
                [*[v for v in s.values() if isinstance(v, torch.Tensor)], *s.get('int8_scales', {}).values()])
         / (4 * a.numel) for k, o in opts.items()}
    print(f"Adam, 4 x {a.numel} floats, {torch.get_num_threads()} threads, {a.reps} interleaved reps")
    for k in opts: print(f"  {k}: median step {med[k]*1e3:.2f} ms, state {b[k]:.3f} bytes/parameter")
    print(f"  int8 / fp32 step time: {med['int8'] / med['fp32']:.2f}x")
