"""Train a small MLP on scikit-learn's bundled digits (1,797 8x8 images, no download) with several fastopt
optimizers, one of them composed on the command line from a list of callbacks, and print a comparison table.

    python examples/train_digits.py --epochs 20 --cbs weight_decay,average_grad,momentum_step
"""
import argparse, sys, time
import torch
from torch import nn
import fastopt

READY_MADE = {  # name: (factory, learning rate suited to it)
    'SGD-mom': (lambda ps, lr: fastopt.SGD(ps, lr=lr, mom=0.9), 0.05),
    'Adam':    (lambda ps, lr: fastopt.Adam(ps, lr=lr), 3e-3),
    'RAdam':   (lambda ps, lr: fastopt.RAdam(ps, lr=lr), 3e-3),
    'QHAdam':  (lambda ps, lr: fastopt.QHAdam(ps, lr=lr), 3e-3),
    'Lamb':    (lambda ps, lr: fastopt.Lamb(ps, lr=lr), 1e-2),
}

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=15, help='epochs per optimizer (default: %(default)s)')
    ap.add_argument('--bs', type=int, default=64, help='batch size (default: %(default)s)')
    ap.add_argument('--cbs', default='weight_decay,average_grad,momentum_step',
                    help='comma-separated fastopt callbacks for the composed optimizer (default: %(default)s)')
    ap.add_argument('--cbs-lr', type=float, default=0.05, help='learning rate of the composed optimizer')
    ap.add_argument('--only', default=None, help='comma-separated subset of: ' + ', '.join([*READY_MADE, 'composed']))
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs < 1: ap.error('--epochs must be at least 1')
    if args.bs < 1: ap.error('--bs must be at least 1')
    cbs = []
    for name in args.cbs.split(','):
        cb = getattr(fastopt.callbacks, name.strip()) if name.strip() in fastopt.callbacks.__all__ else None
        if cb is None: ap.error(f"--cbs: {name.strip()!r} is not a fastopt callback (see fastopt.callbacks)")
        cbs.append(cb)
    args.cbs = cbs
    wanted = [*READY_MADE, 'composed'] if args.only is None else [o.strip() for o in args.only.split(',')]
    for o in wanted:
        if o not in READY_MADE and o != 'composed': ap.error(f'--only: unknown optimizer {o!r}')
    args.only = wanted
    return args

def digits(seed):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_valid = len(x) // 5
    return (x[idx[n_valid:]], y[idx[n_valid:]]), (x[idx[:n_valid]], y[idx[:n_valid]])

def train(make_opt, lr, data, epochs, bs, seed):
    (xt, yt), (xv, yv) = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = make_opt(model.parameters(), lr)
    losses, start = [], time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), bs):
            b = perm[i:i+bs]
            loss = nn.functional.cross_entropy(model(xt[b]), yt[b])
            loss.backward(); opt.step(); opt.zero_grad()
            losses.append(loss.item())
    per_epoch = (time.perf_counter() - start) / epochs
    with torch.no_grad(): acc = (model(xv).argmax(1) == yv).float().mean().item()
    return sum(losses[-10:]) / len(losses[-10:]), acc, per_epoch

def main(argv=None):
    args = parse_args(argv)
    data = digits(args.seed)
    runs = {k: v for k, v in READY_MADE.items() if k in args.only}
    if 'composed' in args.only:
        runs['composed'] = (lambda ps, lr: fastopt.Optimizer(ps, args.cbs, lr=lr), args.cbs_lr)
    print(f"digits: {len(data[0][0])} train / {len(data[1][0])} valid images, {args.epochs} epochs each")
    print(f"{'optimizer':<10} {'train loss':>10} {'valid acc':>9} {'s/epoch':>8}")
    for name, (make_opt, lr) in runs.items():
        loss, acc, per_epoch = train(make_opt, lr, data, args.epochs, args.bs, args.seed)
        print(f"{name:<10} {loss:>10.4f} {acc:>9.1%} {per_epoch:>8.3f}", flush=True)

if __name__ == '__main__':
    try: main()
    except KeyboardInterrupt: sys.exit(130)
