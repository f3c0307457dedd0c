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
                      (['--only', 'Adamm'], "unknown optimizer 'Adamm'")]:
        res = _demo(*args)
        assert res.returncode == 2 and msg in res.stderr and 'Traceback' not in res.stderr

def test_demo_composed_optimizer_learns():
    res = _demo('--epochs', '3', '--only', 'composed,Adam')
    assert res.returncode == 0, res.stderr
    rows = [l.split() for l in res.stdout.splitlines() if l.startswith(('composed', 'Adam'))]
    assert len(rows) == 2 and all(float(r[2].rstrip('%')) > 85 for r in rows), res.stdout
