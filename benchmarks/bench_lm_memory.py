"""A small GPT-style language model trained with AdamW in several ways: optimizer state in float32, bfloat16 or
8 bits, with and without gradient release (`fastopt.release_gradients`) and optimizer accumulation.

    python benchmarks/bench_lm_memory.py [--steps 60] [--layers 4] [--d 256] [--batch 8] [--seq 64] [--accumulate 2]

The text is the repository's own notebooks (their markdown cells, as characters): nothing is downloaded. Every
run starts from the same weights and sees the same batches; the `accumulate=n` row splits each batch into n
micro-batches (the same tokens per step).

Memory, for CPU tensors: the parameters' and the optimizer state's bytes (counted from the tensors), plus the
highest running total of tensor allocations minus frees that torch.profiler records (`profile_memory=True`, the
CPU allocator's events, in order) during two training steps after warm-up: the memory a step needs on top of
parameters and state (activations, gradients, temporaries). Step time is the median (and the fastest) of the
unprofiled training steps. Output: a markdown table (benchmarks/results/lm_memory.md) and the loss curves
(benchmarks/results/lm_memory.png)."""
import argparse, json, pathlib, statistics, sys, time
import torch
from torch import nn
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_memory import LM, peak_bytes   # the model (pre-norm blocks, tied output layer) and the profiler's peak
import fastopt

ROOT = pathlib.Path(__file__).resolve().parent.parent

def corpus() -> tuple[torch.Tensor, list[str]]:
    "The markdown of the repository's notebooks, as a tensor of character ids, and the characters"
    text = '\n\n'.join(''.join(c['source']) for nb in sorted((ROOT/'nbs').glob('*.ipynb'))
                       for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')
    chars = sorted(set(text))
    ids = {c: i for i,c in enumerate(chars)}
    return torch.tensor([ids[c] for c in text]), chars

def batches(data, batch:int, seq:int, n:int, seed:int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n, batch), generator=g)
    return [(torch.stack([data[s:s+seq] for s in row]), torch.stack([data[s+1:s+seq+1] for s in row])) for row in starts]

WAYS = [  # name, state_dtype, gradient release, micro-batches per step
    ('fp32 state', None, False, 1), ('bf16 state', torch.bfloat16, False, 1), ('8-bit state', 'int8', False, 1),
    ('gradient release, fp32 state', None, True, 1), ('gradient release, 8-bit state', 'int8', True, 1),
    ('gradient release + accumulate={n}, fp32 state', None, True, 'n')]

def state_bytes(opt) -> int:
    return sum(v.numel()*v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))

def run(args, data, vocab:int, state_dtype, release:bool, accumulate:int):
    torch.manual_seed(0)
    model = LM(vocab, args.d, args.layers, args.seq)
    nn.init.normal_(model.tok.weight, std=0.02)   # GPT's initialisation: the tied output layer starts near uniform
    try: opt = fastopt.Adam(model.parameters(), lr=args.lr, wd=0.1, sqr_mom=0.99, state_dtype=state_dtype)
    except ValueError as e: return {'skipped': str(e)}
    if release: fastopt.release_gradients(model, opt, accumulate=accumulate)
    def step(x, y) -> float:
        losses = []
        for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):   # micro-batches
            loss = nn.functional.cross_entropy(model(xs).flatten(0, 1), ys.flatten())
            loss.backward(); losses.append(loss.item())
        opt.step(); opt.zero_grad()   # no-ops with gradient release
        return sum(losses)/len(losses)
    losses, times = [], []
    for i, (x, y) in enumerate(batches(data, args.batch, args.seq, args.steps, seed=1)):
        if i == 2: peak = peak_bytes(model, opt, [(x, y)], step)   # a profiled step, after warm-up; not timed
        t = time.perf_counter(); losses.append(step(x, y)); times.append(time.perf_counter() - t)
    params = list(model.parameters())
    return dict(losses=losses, time=statistics.median(times[2:]), fastest=min(times[2:]), peak=peak, n=sum(p.numel() for p in params),
                params=sum(p.numel()*p.element_size() for p in params), state=state_bytes(opt),
                largest=max(p.numel()*p.element_size() for p in params))

def release_target(args, data, vocab:int) -> list[str]:
    "Item 1: with one sequence per batch (gradients outweigh activations), how much of the gradients' memory release saves"
    rows, peaks = [], {}
    for ckpt in (False, True):
        for mode in ('ordinary', 'gradient release', 'free-only hooks'):
            torch.manual_seed(0)
            model = LM(vocab, args.d, args.layers, args.seq, checkpoint=ckpt)
            opt = fastopt.Adam(model.parameters(), lr=args.lr, wd=0.1)
            if mode == 'gradient release': fastopt.release_gradients(model, opt)
            if mode == 'free-only hooks':   # no step at all: the floor of any gradient release under autograd
                for p in model.parameters(): p.register_post_accumulate_grad_hook(lambda p: setattr(p, 'grad', None))
            bs = batches(data, 1, args.seq, 4, seed=2)
            def step(x, y):
                nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                opt.step(); opt.zero_grad()
            for x, y in bs[:2]: step(x, y)   # the state exists
            peaks[ckpt, mode] = peak_bytes(model, opt, bs[2:], step)
    params = list(model.parameters())
    grads, largest = sum(p.numel()*p.element_size() for p in params), max(p.numel()*p.element_size() for p in params)
    mib = lambda b: f"{b/2**20:.2f} MiB"
    rows += ['', f"## Gradient release against its target (batch 1x{args.seq}, the same model)", '',
             f"Target: peak lower than the ordinary step's by the gradients ({mib(grads)}) less the largest one "
             f"({mib(largest)}): {mib(grads - largest)}. 'free-only hooks' frees each gradient when autograd hands it "
             "over and steps nothing: no gradient release can go below it.", '',
             "| activations | training | peak above parameters + state | saved | of the target |", "|---|---|---:|---:|---:|"]
    for ckpt in (False, True):
        base = peaks[ckpt, 'ordinary']
        for mode in ('ordinary', 'gradient release', 'free-only hooks'):
            saved = base - peaks[ckpt, mode]
            rows.append(f"| {'checkpointed' if ckpt else 'kept'} | {mode} | {mib(peaks[ckpt, mode])} | "
                        + (f"{mib(saved)} | {saved/(grads - largest):.0%} |" if mode != 'ordinary' else " | |"))
    return rows

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=60); ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--d', type=int, default=256); ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--seq', type=int, default=64); ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--accumulate', type=int, default=2)
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'lm_memory'))
    args = ap.parse_args()
    data, chars = corpus()
    results = {}
    for name, sd, rel, acc in WAYS:
        acc = args.accumulate if acc == 'n' else acc
        name = name.format(n=acc)
        results[name] = run(args, data, len(chars), sd, rel, acc)
        print(name, 'skipped' if 'skipped' in results[name] else f"{results[name]['time']*1e3:.0f} ms/step", file=sys.stderr)
    base = results['fp32 state']
    mib = lambda b: f"{b/2**20:.1f} MiB"
    final = lambda r: statistics.mean(r['losses'][-10:])
    lines = [f"# A {base['n']/1e6:.2f}M-parameter GPT-style language model, AdamW ({args.steps} steps)", '',
             f"{args.layers} pre-norm blocks, d={args.d}, tied output layer, {len(chars)} characters; batches of "
             f"{args.batch}x{args.seq} characters of the repository's notebooks' markdown ({len(data):,} characters). "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU. Peak tensor memory = parameters + "
             "optimizer state (counted) + the highest running total of allocations minus frees that torch.profiler "
             "records during one training step after warm-up (activations, gradients, temporaries). Final loss: mean "
             "of the last 10 steps. Step times share 2 cores with other work: the fastest step is the least disturbed.", '',
             "| training | state bytes / parameter | peak tensor memory | above parameters + state | median step (fastest) | final loss | vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if 'skipped' in r: lines.append(f"| {name} | skipped: this build refuses the state_dtype | | | | | |"); continue
        lines.append(f"| {name} | {r['state']/r['n']:.2f} | {mib(r['params'] + r['state'] + r['peak'])} | {mib(r['peak'])} | "
                     f"{r['time']*1e3:.0f} ms ({r['fastest']*1e3:.0f} ms) | {final(r):.4f} | {final(r) - final(base):+.4f} |")
    lines += release_target(args, data, len(chars))
    out = pathlib.Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    json.dump({k: v for k,v in results.items()}, open(out.with_suffix('.json'), 'w'))
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        if 'skipped' in r: continue
        a.plot(r['losses'], label=name, lw=1)
        b.plot([l - f for l, f in zip(r['losses'], base['losses'])], label=name, lw=1)
    a.set(xlabel='step', ylabel='training loss', title='loss'); b.set(xlabel='step', ylabel='loss - fp32 loss', title='against fp32 state')
    a.legend(fontsize=7); fig.tight_layout(); fig.savefig(out.with_suffix('.png'), dpi=100)
    print('\n'.join(lines))

if __name__ == '__main__': main()
