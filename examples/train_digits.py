"""Train a small network on scikit-learn's bundled digits (1,797 8x8 images, no download) in a fastai Learner with
several fastopt optimizers, one of them composed on the command line from a list of callbacks. Prints a table
(optimizer, final train loss, validation accuracy, seconds per epoch) and writes a PNG of the training-loss curves.
Progress shows as fastai's bars in a terminal and as one line per epoch in a log (stdout not a terminal).

    python examples/train_digits.py --epochs 5 --cbs weight_decay,average_grad,momentum_step
"""
import argparse, sys, time, warnings
from contextlib import contextmanager, nullcontext
from functools import partial

READY_MADE = {  # name: (opt_func, a learning rate suited to it)
    'SGD-mom': ('SGD', dict(mom=0.9), 0.1),
    'Adam':    ('Adam', {}, 1e-2),
    'RAdam':   ('RAdam', {}, 1e-2),
    'ranger':  ('ranger', {}, 3e-2),
    'Lamb':    ('Lamb', {}, 3e-2),
}

def parse_args(argv):
    import fastopt.callbacks
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=5, help='epochs of fit_one_cycle per optimizer (default: %(default)s)')
    ap.add_argument('--bs', type=int, default=64, help='batch size (default: %(default)s)')
    ap.add_argument('--cbs', default='weight_decay,average_grad,momentum_step',
                    help='comma-separated fastopt callbacks for the composed optimizer (default: %(default)s)')
    ap.add_argument('--cbs-lr', type=float, default=0.1, help='learning rate of the composed optimizer (default: %(default)s)')
    ap.add_argument('--only', default=None, help='comma-separated subset of: ' + ', '.join([*READY_MADE, 'composed']))
    ap.add_argument('--plot', default='digits_losses.png', help='where to write the loss curves (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--progress', choices=['bars', 'lines', 'none'], default=None,
                    help="fastai's progress bars, one line per epoch, or nothing (default: bars in a terminal, else lines)")
    ap.add_argument('--no-bar', action='store_const', dest='progress', const='none', help='same as --progress none')
    args = ap.parse_args(argv)
    # a log (file, pipe, CI) keeps every redraw of a bar: thousands of carriage-return fragments per run
    if args.progress is None: args.progress = 'bars' if sys.stdout.isatty() else 'lines'
    if args.epochs < 1: ap.error('--epochs must be at least 1')
    if args.bs < 1: ap.error('--bs must be at least 1')
    if not args.cbs_lr > 0: ap.error('--cbs-lr must be a positive number')
    names = [n.strip() for n in args.cbs.split(',') if n.strip()]
    unknown = [n for n in names if n not in fastopt.callbacks.__all__]
    if unknown or not names:
        ap.error(f"--cbs: {', '.join(map(repr, unknown)) or 'nothing'} is not a fastopt callback (choose from "
                 f"{', '.join(fastopt.callbacks.__all__)})")
    args.cbs = [getattr(fastopt.callbacks, n) for n in names]
    wanted = [*READY_MADE, 'composed'] if args.only is None else [o.strip() for o in args.only.split(',')]
    for o in wanted:
        if o not in READY_MADE and o != 'composed': ap.error(f'--only: unknown optimizer {o!r}')
    args.only = wanted
    return args

def digits_dls(bs, seed):
    import torch
    from fastai.basics import DataLoaders
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    ds = list(zip(x[idx], y[idx]))
    n_valid = len(ds) // 5
    return DataLoaders.from_dsets(ds[n_valid:], ds[:n_valid], bs=bs, device='cpu')

def composed(cbs):
    "An Optimizer from `cbs`; `mom` is added when no callback declares it, since fit_one_cycle schedules it"
    import fastopt
    extra = {} if 'mom' in fastopt.callback_defaults(cbs) else dict(mom=0.9)
    return partial(fastopt.Optimizer, cbs=cbs, **extra)

def epoch_logger(learn, n_epoch):
    "A fastai logger that prints the Recorder's values of each epoch on one line"
    def log(values):
        epoch, *rest = values
        names = learn.recorder.metric_names[1:]
        fields = [f'{n} {v:.4f}' if isinstance(v, float) else f'{n} {v}' for n, v in zip(names, rest)]
        print(f'  epoch {epoch + 1}/{n_epoch}: ' + ', '.join(fields), flush=True)
    return log

@contextmanager
def showing_progress(learn, progress:str, n_epoch:int):
    "A context for fitting `learn` with `progress` ('bars', 'lines' or 'none') shown"
    from fastai.learner import noop   # fastai's own, which its progress bars compare the logger with (not fastcore's)
    old_logger = learn.logger
    # with bars, fastai's table of epochs is left out too: the final table sums up every optimizer
    learn.logger = epoch_logger(learn, n_epoch) if progress == 'lines' else noop
    try:
        with (nullcontext() if progress == 'bars' else learn.no_bar()): yield
    finally: learn.logger = old_logger

def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore')
    import torch
    from torch import nn
    from fastai.basics import Learner, CrossEntropyLossFlat, accuracy
    import fastai.callback.schedule  # fit_one_cycle
    import fastopt
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    dls = digits_dls(args.bs, args.seed)
    runs = {k: (partial(getattr(fastopt, f), **kw), lr) for k, (f, kw, lr) in READY_MADE.items() if k in args.only}
    if 'composed' in args.only: runs['composed'] = (composed(args.cbs), args.cbs_lr)
    print(f"digits: {len(dls.train_ds)} train / {len(dls.valid_ds)} valid images; fit_one_cycle({args.epochs}) each")
    rows, curves = [], {}
    for name, (opt_func, lr) in runs.items():
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy)
        print(f"\n{name} (lr {lr:g})", flush=True)
        start = time.perf_counter()
        with showing_progress(learn, args.progress, args.epochs): learn.fit_one_cycle(args.epochs, lr)
        per_epoch = (time.perf_counter() - start) / args.epochs
        losses = [float(l) for l in learn.recorder.losses]   # before validate(), which resets the recorder
        with learn.no_bar(), learn.no_logging(): valid_loss, acc = learn.validate()
        curves[name] = losses
        rows.append((name, losses[-1], acc, per_epoch))
    print(f"\n{'optimizer':<10} {'train loss':>10} {'valid acc':>9} {'s/epoch':>8}")
    for name, loss, acc, per_epoch in rows: print(f"{name:<10} {loss:>10.4f} {acc:>9.1%} {per_epoch:>8.3f}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items(): ax.plot(losses, label=name)
    ax.set_xlabel('batch'); ax.set_ylabel('training loss (smoothed)'); ax.set_yscale('log'); ax.legend()
    ax.set_title('digits: fastopt optimizers in a fastai Learner')
    fig.savefig(args.plot, dpi=120, bbox_inches='tight')
    print(f"loss curves: {args.plot}")

if __name__ == '__main__':
    try: main()
    except KeyboardInterrupt: sys.exit(130)
