"""Peak memory and step time of a small transformer language model trained with AdamW, ordinarily and with
gradient release (`fastopt.release_gradients`).

    python benchmarks/bench_memory.py [--steps 6] [--layers 2] [--d 512] [--batch 1] [--seq 64]

Memory is the CPU allocator's, as torch.profiler records it (`profile_memory=True`): every tensor allocation and
free, in order. Over some training steps (after warm-up steps, so that the optimizer state already exists) the
script adds them up and reports the highest total above the level where the window started: the memory that a
training step needs beyond parameters and optimizer state (activations, gradients, temporaries). Step time is
the median over separate, unprofiled steps. The text is generated here (a random order-2 Markov chain over
bytes); nothing is downloaded."""
import argparse, statistics, time
import torch, torch.utils.checkpoint
from torch import nn
from torch.profiler import profile, ProfilerActivity
import fastopt

def text(n:int, seed:int=0) -> torch.Tensor:
    "n bytes from a random order-2 Markov chain over a 64-letter alphabet"
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 64, (64, 64, 4), generator=g)   # each pair of letters allows four next letters
    out, a, b = torch.empty(n, dtype=torch.long), 0, 1
    choice = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        a, b = b, int(table[a, b, choice[i]])
        out[i] = b
    return out

class LM(nn.Module):
    "A decoder-only transformer: token and position embeddings, `layers` pre-norm blocks, a tied output layer"
    def __init__(self, vocab:int, d:int, layers:int, seq:int, checkpoint:bool=False):
        super().__init__()
        self.checkpoint = checkpoint   # recompute each block's activations during backward
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        block = lambda: nn.TransformerEncoderLayer(d, d//64, 4*d, dropout=0., batch_first=True, norm_first=True)
        self.blocks, self.norm = nn.ModuleList(block() for _ in range(layers)), nn.LayerNorm(d)
        self.register_buffer('mask', nn.Transformer.generate_square_subsequent_mask(seq))
    def forward(self, x):
        h = self.tok(x) + self.pos[:x.shape[1]]
        for b in self.blocks:
            if self.checkpoint: h = torch.utils.checkpoint.checkpoint(b, h, self.mask, None, True, use_reentrant=False)
            else: h = b(h, src_mask=self.mask, is_causal=True)
        return self.norm(h) @ self.tok.weight.t()

def setup(args, release:bool, checkpoint:bool):
    torch.manual_seed(0)
    model = LM(64, args.d, args.layers, args.seq, checkpoint)
    opt = fastopt.Adam(model.parameters(), lr=1e-3, wd=0.01)   # Adam with true weight decay: AdamW
    return model, opt, (fastopt.release_gradients(model, opt) if release else None)

def batches(data, args, n:int, seed:int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - args.seq - 1, (n, args.batch), generator=g)
    return [(torch.stack([data[s:s+args.seq] for s in row]), torch.stack([data[s+1:s+args.seq+1] for s in row]))
            for row in starts]

def train_step(model, opt, x, y) -> float:
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step(); opt.zero_grad()   # no-ops with gradient release
    return loss.item()

def peak_bytes(model, opt, steps, step=None) -> int:
    "The highest total of tensor memory allocated during `steps` (run by `step(x, y)`), above the level where they started"
    step = step or (lambda x, y: train_step(model, opt, x, y))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for x, y in steps: step(x, y)
    # every allocation (+bytes) and free (-bytes) on the CPU, in order (prof.events() attributes most to ops)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak

def measure(args, release:bool, checkpoint:bool, data) -> dict:
    model, opt, _ = setup(args, release, checkpoint)
    for x, y in batches(data, args, 2, seed=1): train_step(model, opt, x, y)   # state exists, kernels are built
    peak = peak_bytes(model, opt, batches(data, args, 2, seed=2))
    times = []
    for x, y in batches(data, args, args.steps, seed=3):
        t = time.perf_counter(); train_step(model, opt, x, y); times.append(time.perf_counter() - t)
    params = list(model.parameters())
    return dict(peak=peak, time=statistics.median(times), grads=sum(p.numel()*p.element_size() for p in params),
                largest=max(p.numel()*p.element_size() for p in params), n=sum(p.numel() for p in params),
                weights=[p.detach().clone() for p in params])

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=6, help='timed steps')
    ap.add_argument('--layers', type=int, default=2); ap.add_argument('--d', type=int, default=512)
    ap.add_argument('--batch', type=int, default=1); ap.add_argument('--seq', type=int, default=64)
    args = ap.parse_args()
    data = text(20_000)
    runs = {(ckpt, rel): measure(args, rel, ckpt, data) for ckpt in (False, True) for rel in (False, True)}
    plain = runs[False, False]
    same = all(torch.equal(a, b) for ckpt in (False, True) for a, b in zip(runs[ckpt, False]['weights'], runs[ckpt, True]['weights']))
    mib = lambda b: f"{b/2**20:.1f} MiB"
    print(f"transformer LM: {plain['n']/1e6:.2f}M parameters, {args.layers} layers, d={args.d}, batch {args.batch}x{args.seq} "
          f"tokens, AdamW, torch {torch.__version__}, {torch.get_num_threads()} threads")
    target = plain['grads'] - plain['largest']
    print(f"gradients {mib(plain['grads'])}, largest parameter {mib(plain['largest'])}, target saving {mib(target)}; "
          f"weights after training bit-identical with and without release: {same}\n")
    print("| activations | training | peak memory above parameters and state | saved | median step |")
    print("|---|---|---:|---:|---:|")
    for ckpt in (False, True):
        base = runs[ckpt, False]['peak']
        for rel in (False, True):
            r = runs[ckpt, rel]
            print(f"| {'checkpointed' if ckpt else 'kept'} | {'gradient release' if rel else 'ordinary'} | {mib(r['peak'])} | "
                  f"{mib(base - r['peak']) if rel else ''} | {r['time']*1e3:.1f} ms |")

if __name__ == '__main__': main()
