"Project-level checks: the README is generated from the home notebook; the demo's command line behaves."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_readme_is_generated_from_index_notebook():
    sys.path.insert(0, str(ROOT/'tools'))
    from make_readme import render
    assert (ROOT/'README.md').read_text() == render(), "README.md is stale: run `python tools/make_readme.py`"

def _demo(*args):
    return subprocess.run([sys.executable, str(ROOT/'examples'/'train_digits.py'), *args],
                          capture_output=True, text=True, timeout=300)

def test_demo_rejects_bad_options_in_one_line():
    for args, msg in [(['--cbs', 'nope'], "'nope' is not a fastopt callback"), (['--epochs', '0'], 'at least 1'),
                      (['--only', 'Adamm'], "unknown optimizer 'Adamm'"), (['--cbs-lr', '-1'], 'positive')]:
        res = _demo(*args)
        assert res.returncode == 2 and msg in res.stderr and 'Traceback' not in res.stderr
        assert len([l for l in res.stderr.splitlines() if l.startswith('train_digits.py: error')]) == 1

def test_demo_trains_in_a_learner_and_plots(tmp_path):
    plot = tmp_path/'curves.png'
    res = _demo('--epochs', '3', '--only', 'composed,ranger', '--no-bar', '--plot', str(plot),
                '--cbs', 'weight_decay,sgd_step')   # no callback declares mom: the demo adds it for fit_one_cycle
    assert res.returncode == 0, res.stderr
    rows = [l.split() for l in res.stdout.splitlines() if l.startswith(('composed', 'ranger'))]
    rows = [r for r in rows if len(r) == 4]
    assert len(rows) == 2 and all(float(r[2].rstrip('%')) > 85 for r in rows), res.stdout
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
