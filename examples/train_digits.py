"""Train a small network on scikit-learn's bundled digits (1,797 8x8 images, no download) in a fastai Learner with
several fastopt optimizers, one of them composed on the command line from a list of callbacks. Prints a table
(optimizer, final train loss, validation accuracy, seconds per epoch) and writes a PNG of the training-loss curves.
Progress shows as fastai's bars in a terminal and as one line per epoch in a log (stdout not a terminal).

    python examples/train_digits.py --epochs 5 --cbs weight_decay,average_grad,momentum_step
    python examples/train_digits.py --opt Lion --opt Adafactor,Muon

Every ready-made optimizer can be chosen with --opt. Muon trains the hidden layer's weight matrix and AdamW the
rest (`MuonAdamW` with `muon_groups` as the fastai splitter); the Schedule-Free ones train at a constant rate with
`Learner.fit` and their `ScheduleFreeEval` callback (validation at the average), the others with fit_one_cycle.
"""
import argparse, sys, time, warnings
from contextlib import contextmanager, nullcontext
from functools import partial

OPTIMIZERS = {  # name: (fastopt factory, its arguments, a learning rate suited to it)
    'SGD':               ('SGD', {}, 0.1),
    'SGD-mom':           ('SGD', dict(mom=0.9), 0.1),
    'RMSProp':           ('RMSProp', {}, 1e-3),
    'Adam':              ('Adam', {}, 1e-2),
    'RAdam':             ('RAdam', {}, 1e-2),
    'QHAdam':            ('QHAdam', {}, 1e-2),
    'Larc':              ('Larc', {}, 0.1),
    'Lamb':              ('Lamb', {}, 3e-2),
    'ranger':            ('ranger', {}, 3e-2),
    'Lion':              ('Lion', dict(wd=0.1), 3e-3),
    'Adan':              ('Adan', {}, 3e-2),
    'ADOPT':             ('ADOPT', {}, 1e-2),
    'AdEMAMix':          ('AdEMAMix', {}, 1e-2),
    'StableAdamW':       ('StableAdamW', {}, 1e-2),
    'Adafactor':         ('Adafactor', {}, 5e-2),
    'ScheduleFreeAdamW': ('ScheduleFreeAdamW', {}, 1e-2),
    'ScheduleFreeSGD':   ('ScheduleFreeSGD', {}, 0.5),
    'Muon':              ('MuonAdamW', {}, 1e-2),
}
DEFAULT = ['SGD-mom', 'Adam', 'RAdam', 'ranger', 'Lamb', 'Lion', 'Adan', 'ScheduleFreeAdamW', 'Muon', 'composed']
ALIASES = {'MuonAdamW': 'Muon'}

def parse_args(argv):
    import fastopt.callbacks
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=5, help='epochs of fit_one_cycle per optimizer (default: %(default)s)')
    ap.add_argument('--bs', type=int, default=64, help='batch size (default: %(default)s)')
    ap.add_argument('--cbs', default='weight_decay,average_grad,momentum_step',
                    help='comma-separated fastopt callbacks for the composed optimizer (default: %(default)s)')
    ap.add_argument('--cbs-lr', type=float, default=0.1, help='learning rate of the composed optimizer (default: %(default)s)')
    ap.add_argument('--opt', '--only', action='append', default=None, metavar='NAME',
                    help='an optimizer to run; repeatable, or a comma-separated list (default: ' + ','.join(DEFAULT) +
                         '); one of: ' + ', '.join([*OPTIMIZERS, 'composed']))
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
    wanted = DEFAULT if args.opt is None else [o.strip() for arg in args.opt for o in arg.split(',') if o.strip()]
    known = {n.lower(): n for n in [*OPTIMIZERS, 'composed']} | {a.lower(): n for a, n in ALIASES.items()}
    for o in wanted:
        if o.lower() not in known: ap.error(f"--opt: unknown optimizer {o!r} (choose from {', '.join([*OPTIMIZERS, 'composed'])})")
    args.opt = list(dict.fromkeys(known[o.lower()] for o in wanted))   # each once, in the order given
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
    return DataLoaders.from_dsets(ds[n_valid:], ds[:n_valid], bs=bs, device='cpu', num_workers=0)   # in memory: no workers

def composed(cbs):
    "An Optimizer from `cbs`; `mom` is added when no callback declares it, since fit_one_cycle schedules it"
    import fastopt
    extra = {} if 'mom' in fastopt.callback_defaults(cbs) else dict(mom=0.9)
    return partial(fastopt.Optimizer, cbs=cbs, **extra)

def learner_args(name):
    "What the Learner needs besides the optimizer: Muon's splitter, Schedule-Free's callback"
    import fastopt.modern
    if name == 'Muon': return dict(splitter=fastopt.modern.muon_groups)   # hidden matrix: Muon; the rest: AdamW
    if name.startswith('ScheduleFree'): return dict(cbs=fastopt.modern.ScheduleFreeEval())
    return {}

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
    runs = {name: (composed(args.cbs), args.cbs_lr) if name == 'composed' else
                  (partial(getattr(fastopt, OPTIMIZERS[name][0]), **OPTIMIZERS[name][1]), OPTIMIZERS[name][2])
            for name in args.opt}
    print(f"digits: {len(dls.train_ds)} train / {len(dls.valid_ds)} valid images; fit_one_cycle({args.epochs}) each"
          + (f" (Schedule-Free: fit({args.epochs}) at a constant rate)" if any(n.startswith('ScheduleFree') for n in runs) else ''))
    rows, curves = [], {}
    for name, (opt_func, lr) in runs.items():
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        extra = learner_args(name)
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy, **extra)
        print(f"\n{name} (lr {lr:g})", flush=True)
        start = time.perf_counter()
        fit = learn.fit if name.startswith('ScheduleFree') else learn.fit_one_cycle
        with showing_progress(learn, args.progress, args.epochs): fit(args.epochs, lr)
        per_epoch = (time.perf_counter() - start) / args.epochs
        losses = [float(l) for l in learn.recorder.losses]   # before validate(), which resets the recorder
        with learn.no_bar(), learn.no_logging(): valid_loss, acc = learn.validate()
        curves[name] = losses
        rows.append((name, losses[-1], acc, per_epoch))
    width = max(len('optimizer'), *(len(r[0]) for r in rows))
    print(f"\n{'optimizer':<{width}} {'train loss':>10} {'valid acc':>9} {'s/epoch':>8}")
    for name, loss, acc, per_epoch in rows: print(f"{name:<{width}} {loss:>10.4f} {acc:>9.1%} {per_epoch:>8.3f}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items(): ax.plot(losses, label=name)
    ax.set_xlabel('batch'); ax.set_ylabel('training loss (smoothed)'); ax.set_yscale('log'); ax.legend(fontsize='small', ncol=2)
    ax.set_title('digits: fastopt optimizers in a fastai Learner')
    fig.savefig(args.plot, dpi=120, bbox_inches='tight')
    print(f"loss curves: {args.plot}")

if __name__ == '__main__':
    try: main()
    except KeyboardInterrupt: sys.exit(130)
