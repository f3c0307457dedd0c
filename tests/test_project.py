"""Project-level checks: the README is generated from the home notebook; links work from a checkout (no online
site is linked: none exists); the demo's command line behaves."""
import json, re, subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_readme_is_generated_from_index_notebook():
    sys.path.insert(0, str(ROOT/'tools'))
    from make_readme import render
    assert (ROOT/'README.md').read_text() == render(), "README.md is stale: run `python tools/make_readme.py`"

# The project's own online documentation, which does not exist: the site is built locally (`make docs` -> _docs/)
OWN_SITE = re.compile(r'https?://(?:[\w-]+\.)*fastopt\.github\.io[^\s)"\'>]*|https?://[\w-]+\.github\.io/fastopt[^\s)"\'>]*')

def _read_by_users():
    "Files whose links a user follows: README, notebooks (all cells), the library (its docstrings), tools, examples"
    return [ROOT/'README.md', ROOT/'DEVELOPERS.md', ROOT/'pyproject.toml', *sorted((ROOT/'nbs').glob('*.ipynb')),
            *sorted((ROOT/'fastopt').glob('*.py')), *sorted((ROOT/'tools').glob('*.py')), *sorted((ROOT/'examples').glob('*.py'))]

def test_no_links_to_an_online_site_that_does_not_exist():
    hits = [f'{p.relative_to(ROOT)}: {url}' for p in _read_by_users() for url in OWN_SITE.findall(p.read_text())]
    assert hits == [], 'links to the unbuilt online site (link the notebook instead, e.g. 08_fusion.ipynb):\n' + '\n'.join(hits)
    # nbdev writes "Docs: <Documentation URL>" into each exported module's docstring: there is no such URL to give
    assert 'Documentation' not in tomllib.loads((ROOT/'pyproject.toml').read_text())['project'].get('urls', {})
    assert not [p.name for p in (ROOT/'fastopt').glob('*.py') if re.search(r'^Docs: ', p.read_text(), re.M)]

def _relative_links(md:str) -> list[str]:
    "Paths (not URLs, not same-page anchors) that Markdown links and images or HTML src/href in `md` point to"
    md = re.sub(r'```.*?```|`[^`\n]*`', '', md, flags=re.S)   # code is not a link
    targets = re.findall(r'\]\(([^)\s]+)\)', md) + re.findall(r'(?:src|href)="([^"]+)"', md)
    return [t.split('#')[0] for t in targets if not re.match(r'[a-z][\w+.-]*:|#', t)]

def test_readme_relative_links_point_to_files_in_the_repository():
    links = _relative_links((ROOT/'README.md').read_text())
    assert links, 'README.md links no notebook'
    assert [t for t in links if not (ROOT/t).exists()] == []

def test_notebook_relative_links_point_to_files_in_the_repository():
    "Written as paths of notebooks (08_fusion.ipynb), links work on a git host; the docs build maps them to pages"
    missing = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            if cell['cell_type'] != 'markdown': continue
            missing += [f'{nb.name} cell {i} ({cell.get("id")}): {t}' for t in _relative_links(''.join(cell['source']))
                        if not (nb.parent/t).exists()]
    assert missing == [], 'missing files (a page.html link works only in the built site):\n' + '\n'.join(missing)

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

def test_demo_in_a_log_prints_one_line_per_epoch(tmp_path):
    "stdout piped, as in CI or `make demo > log`: no progress-bar redraws (carriage returns), one line per epoch"
    res = _demo('--epochs', '2', '--only', 'Adam', '--plot', str(tmp_path/'curves.png'))
    assert res.returncode == 0, res.stderr
    assert '\r' not in res.stdout + res.stderr and '█' not in res.stdout
    lines = res.stdout.splitlines()
    assert len(lines) < 15, res.stdout
    assert [l.split(':')[0].strip() for l in lines if l.strip().startswith('epoch ')] == ['epoch 1/2', 'epoch 2/2']
    assert any(l.startswith('optimizer') for l in lines) and any(l.split()[:1] == ['Adam'] for l in lines), res.stdout
