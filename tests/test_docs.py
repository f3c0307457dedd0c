"""The documentation site, built as users get it (`make docs`) and read in a real browser: Debian's headless
Chromium driven by Playwright. Every page: no JavaScript errors, no broken images or internal links; every API
entry has a signature and a parameter table; formulas are rendered by MathJax; search finds Lookahead and ranger.
Screenshots of the home, Optimizer and Lookahead pages are saved in test-artifacts/."""
import functools, http.server, re, shutil, subprocess, sys, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE, ARTIFACTS = ROOT/'_docs', ROOT/'test-artifacts'
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
sys.path.insert(0, str(ROOT/'tools'))
import build_docs

@pytest.fixture(scope='module')
def site():
    "Build the site, serve it on a loopback port; yields the base URL"
    res = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py')], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}'
    server.shutdown()

@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        yield b
        b.close()

PAGES = ['index', 'optimizer', 'callbacks', 'optimizers', 'modern', 'param_groups', 'lookahead', 'wrapper', 'fastai', 'pytorch', 'fusion', 'trace',
         'cpu', 'storage', 'foreach', 'triton', 'performance', 'distributed', 'memory', 'checkpoints', 'guarantees', 'api']
WITH_MATH = ['callbacks', 'optimizers', 'modern', 'lookahead', 'storage']

def _open(browser, url):
    page = browser.new_page(viewport={'width': 1300, 'height': 1000})
    errors = []
    page.on('console', lambda m: errors.append(m.text) if m.type == 'error' else None)
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.on('requestfailed', lambda r: errors.append(f'failed to load {r.url}'))
    page.goto(url, wait_until='networkidle')
    return page, errors

def test_every_page_is_built(site):
    assert sorted(p.stem for p in SITE.glob('*.html') if p.stem not in ('genindex', 'search')) == sorted(PAGES)

@pytest.mark.parametrize('name', PAGES)
def test_page_has_no_errors_broken_images_or_links(site, browser, name):
    page, errors = _open(browser, f'{site}/{name}.html')
    assert errors == [], errors
    broken = page.eval_on_selector_all('img', 'imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)')
    assert broken == []
    hrefs = page.eval_on_selector_all('a[href]', 'as => as.map(a => a.getAttribute("href"))')
    internal = [h for h in hrefs if not h.startswith(('http:', 'https:', 'mailto:'))]
    assert internal, 'a page without internal links: the sidebar is missing'
    for href in internal:
        target, _, anchor = href.partition('#')
        target_file = SITE/(target or f'{name}.html')
        assert target_file.exists(), f'{name}.html links to missing {href}'
        if anchor and target_file.suffix == '.html':
            html = target_file.read_text()
            assert f'id="{anchor}"' in html, f'{name}.html links to {href}: no such anchor'
    page.close()

@pytest.mark.parametrize('name', ['optimizer', 'callbacks', 'optimizers', 'lookahead', 'wrapper', 'api'])
def test_every_api_entry_has_a_signature_and_a_parameter_table(site, browser, name):
    page, _ = _open(browser, f'{site}/{name}.html')
    report = page.evaluate('''() => [...document.querySelectorAll('a.doc-entry')].map(a => {
        // an entry: the anchor under its heading, then the signature, docstring and table up to the next entry
        let sig = false, table = false;
        for (let el = (a.closest('p') || a).nextElementSibling; el && !el.querySelector('a.doc-entry'); el = el.nextElementSibling) {
            if (el.matches('pre') || el.querySelector('pre')) sig = true;
            if (el.matches('table') || el.querySelector('table')) table = true;
        }
        return [a.id, sig, table];
    })''')
    assert len(report) > 2
    bad = [r for r in report if not (r[1] and r[2])]
    assert bad == [], bad
    page.close()

@pytest.mark.parametrize('name', WITH_MATH)
def test_formulas_are_rendered(site, browser, name):
    page, errors = _open(browser, f'{site}/{name}.html')
    page.wait_for_selector('.MathJax_CHTML, mjx-container', timeout=30_000)
    assert page.locator('.MathJax_CHTML, mjx-container').count() > 0 and errors == []
    assert page.locator('.math:not(:has(.MathJax_CHTML))').count() < page.locator('.math').count()
    page.close()

@pytest.mark.parametrize('query', ['Lookahead', 'ranger'])
def test_search_finds(site, browser, query):
    page, errors = _open(browser, f'{site}/search.html?q={query}')
    page.wait_for_selector('#search-results ul.search li', timeout=30_000)
    results = page.locator('#search-results ul.search li').all_inner_texts()
    assert any(query.lower() in r.lower() for r in results), results
    assert errors == []
    page.close()

def test_screenshots(site, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    for name in ('index', 'optimizer', 'lookahead'):
        page, _ = _open(browser, f'{site}/{name}.html')
        page.screenshot(path=str(ARTIFACTS/f'docs-{name}.png'), full_page=False)
        page.close()
        assert (ARTIFACTS/f'docs-{name}.png').stat().st_size > 10_000

def test_api_reference_lists_every_public_name_with_a_docstring(site):
    import fastopt
    html = (SITE/'api.html').read_text()
    anchors = build_docs._anchors()
    missing = [n for n in fastopt.__all__ if f'id="{anchors.get(n, n.lower())}"' not in html]
    assert missing == []
    undocumented = [n for n in fastopt.__all__
                    if not ((getattr(fastopt, n).__doc__ or '').strip() if callable(getattr(fastopt, n))
                            else build_docs.variable_doc(sys.modules[_module_of(n)], n))]
    assert undocumented == []

def _module_of(name):
    import importlib, fastopt
    from fastopt._modidx import d
    return next(m for m in d['syms'] if name in getattr(importlib.import_module(m), '__all__', []))

def test_cross_references(site):
    "Backticked fastopt names link to their API entry; PyTorch and fastai names to those projects' documentation"
    html = {p.stem: p.read_text() for p in SITE.glob('*.html')}
    api_links = [h for page in html.values() for h in re.findall(r'class="api-link" href="([^"]+)"', page)]
    assert len(api_links) > 50 and sum(h.startswith('api.html#') for h in api_links) > 30
    assert 'href="https://docs.pytorch.org/docs/stable/optim.html"' in html['pytorch']
    assert 'href="https://docs.fast.ai/learner.html"' in html['fastai']
    assert not any('fastopt.github.io' in page for page in html.values()), 'a link to the unbuilt online site'
    assert not any('#LNone' in page for page in html.values()), 'a [source] link without its line'
    # the home page links notebooks (08_fusion.ipynb), which works in a checkout; on the site that is the page
    assert re.search(r'href="fusion\.html"><span[^>]*>fused kernel', html['index'])
