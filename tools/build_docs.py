"""Build the documentation site into _docs/ from nbs/, offline: `python tools/build_docs.py` (or `make docs`).

nbdev renders with Quarto, which cannot be installed here, so the site is built with Sphinx instead:
1. stage: copy the notebooks, moving the imports of cells that mix imports with other code into cells of their own
   (nbdev's processor executes every cell that imports something; the rest of such a cell needs earlier cells);
2. nbdev's own processor (`nbdev.serve.proc_nbs`): drops export and hidden cells, runs `show_doc`, adds `show_doc`
   for exported names that have none;
3. for myst-nb: nbdev's `#|` cell options become cell tags, each `show_doc` cell becomes a Markdown cell holding
   its output, and an API reference page lists every public name of `fastopt`;
4. Sphinx + myst-nb (stored outputs, never re-executed) + furo, with MathJax served from the site itself;
   any warning fails the build."""
import ast, functools, json, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE, SRC, OUT = ROOT/'_stage', ROOT/'_sphinx', ROOT/'_docs'

def _split_imports(cell):
    "[imports cell, rest cell] for a code cell that mixes top-level imports with other statements, else [cell]"
    src = ''.join(cell['source'])
    if cell['cell_type'] != 'code' or src.lstrip().startswith('#|'): return [cell]
    try: tree = ast.parse(src)
    except SyntaxError: return [cell]
    lines = src.splitlines(keepends=True)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imports or len(imports) == len(tree.body): return [cell]
    import_lines = {i for n in imports for i in range(n.lineno - 1, n.end_lineno)}
    head = {**cell, 'source': ''.join(l for i, l in enumerate(lines) if i in import_lines), 'outputs': [],
            'execution_count': None, 'id': cell.get('id', 'x') + '-imports'}
    rest = {**cell, 'source': ''.join(l for i, l in enumerate(lines) if i not in import_lines)}
    return [head, rest]

def stage():
    shutil.rmtree(STAGE, ignore_errors=True); (STAGE/'nbs').mkdir(parents=True)
    for f in sorted((ROOT/'nbs').glob('*.ipynb')):
        nb = json.loads(f.read_text())
        nb['cells'] = [c for cell in nb['cells'] for c in _split_imports(cell)]
        (STAGE/'nbs'/f.name).write_text(json.dumps(nb, indent=1))

def process():
    from nbdev.serve import proc_nbs
    return proc_nbs(str(STAGE/'nbs'), n_workers=2, force=True)

# ---- 3. notebooks for myst-nb ----

def _doc_url() -> str:
    "Where nbdev points backticked names: its join of pyproject's Documentation URL, '/' when there is none"
    from urllib.parse import urljoin
    from fastopt._modidx import d
    s = d['settings']
    return urljoin(s.get('doc_host', '') + '/', s.get('doc_baseurl', '/')).rstrip('/') + '/'

DOC_URL = _doc_url()   # fix_links makes links under it relative, so that the built site works offline
TAGS = {('echo', 'false'): 'remove-input', ('output', 'false'): 'remove-output', ('include', 'false'): 'remove-cell',
        ('code-fold', 'true'): 'hide-input', ('code-fold', 'show'): 'hide-input'}
MATHJAX = Path('/usr/share/javascript/mathjax')   # Debian's libjs-mathjax, copied into the site

def page_name(nb:Path) -> str: return re.sub(r'^\d+_', '', nb.stem)   # as nbdev names pages: 04_lookahead -> lookahead

def _namespace() -> dict:
    "Every name of every fastopt module, to find the objects that `show_doc` cells document"
    import importlib, fastopt
    from fastopt._modidx import d
    ns = {}
    for mod in d['syms']: ns.update(vars(importlib.import_module(mod)))
    return ns

@functools.cache
def _anchors() -> dict:
    "nbdev's anchor for each documented name ('Lookahead.state_dict' -> 'lookahead.state_dict')"
    from fastopt._modidx import d
    return {k[len(m)+1:]: v[0].split('#', 1)[1] for m, syms in d['syms'].items() for k, v in syms.items()}

def api_names(anchors:dict) -> list[str]:
    "What the API reference documents: every public name, and the public methods of public classes"
    import fastopt
    res = []
    for n in fastopt.__all__:
        res.append(n)
        if isinstance(getattr(fastopt, n), type):
            res += sorted(k for k in anchors if k.startswith(n + '.') and not k.split('.')[-1].startswith('_'))
    return res

@functools.cache
def public_anchors() -> frozenset:
    "The anchors of the API reference's entries"
    anchors = _anchors()
    return frozenset(anchors.get(n, n.lower()) for n in api_names(anchors))

def _md_escape(s) -> str: return str(s).replace('|', '\\|').replace('\n', ' ')

def param_table(obj) -> str:
    "A Markdown table of `obj`'s parameters from its `# comment` docments"
    from fastcore.docments import docments
    import inspect
    try: docs = docments(obj, full=True, returns=False)
    except (TypeError, ValueError): docs = {}
    rows = []
    for name, d in docs.items():
        if name in ('self', 'cls'): continue
        anno = '' if d['anno'] is inspect._empty else getattr(d['anno'], '__name__', str(d['anno']))
        default = '' if d['default'] is inspect._empty else f"`{d['default']!r}`"
        rows.append(f"| `{name}` | {_md_escape(anno)} | {_md_escape(default)} | {_md_escape(d['docment'] or '')} |")
    if not rows: rows = ['| *(no parameters)* | | | |']
    return '\n'.join(['| Parameter | Type | Default | Details |', '|---|---|---|---|', *rows])

def fix_links(md:str) -> str:
    "nbdev's links: a backticked public name to its API entry (others to their chapter); chapters by page name"
    def name_link(m):
        text, page, anchor = m.groups()
        href = f'api.html#{anchor}' if anchor in public_anchors() else f'{page}.html#{anchor}'
        label = f'<code>{text[1:-1]}</code>' if text.startswith('`') else text
        return f'<a class="api-link" href="{href}">{label}</a>'
    md = re.sub(r'\[([^\]]+)\]\(' + re.escape(DOC_URL) + r'([\w-]+)\.html#([^)\s]+)\)', name_link, md)
    md = md.replace('](' + DOC_URL, '](')
    md = re.sub(r'\]\((?:\d+_)?([\w-]+)\.(?:html|ipynb)(#[^)\s]*)?\)', lambda m: f"]({m.group(1)}.ipynb{m.group(2) or ''})", md)
    md = re.sub(r'(\[source\]\([^)]*\))\{[^}]*\}', r'\1', md)
    parts = re.split(r'(```.*?```)', md, flags=re.S)   # code blocks stay as they are
    return ''.join(p if i % 2 else re.sub(r'(?<![\[>])`([\w.]+)`(?!\]|</code>)', _external_link, p) for i, p in enumerate(parts))

# Names from PyTorch and fastai link to their documentation (module pages, which are stable addresses)
TORCH_DOCS = 'https://docs.pytorch.org/docs/stable/'
TORCH_PAGES = {'torch.optim': 'optim.html', 'torch.distributed': 'distributed.html', 'torch.amp': 'amp.html',
               'torch.nn': 'nn.html', 'torch.utils': 'data.html', 'torch': 'torch.html'}
FASTAI_DOCS = {'Learner': 'learner.html', 'fit_one_cycle': 'callback.schedule.html', 'fit_flat_cos': 'callback.schedule.html',
               'lr_find': 'callback.schedule.html', 'fine_tune': 'callback.schedule.html', 'distrib_ctx': 'distributed.html',
               'fastai.optimizer': 'optimizer.html', 'Learner.save': 'learner.html', 'Learner.load': 'learner.html'}

def _external_link(m) -> str:
    name = m.group(1)
    if name.startswith('torch'):
        page = next(v for k, v in TORCH_PAGES.items() if name == k or name.startswith(k + '.'))
        return f'[`{name}`]({TORCH_DOCS}{page})'
    if name in FASTAI_DOCS: return f'[`{name}`](https://docs.fast.ai/{FASTAI_DOCS[name]})'
    return m.group(0)

def _source_line(obj) -> str:
    "The '#L<line>' anchor of `obj`'s definition in its source file, '' when it has none"
    import inspect
    obj = getattr(obj, 'fget', obj)   # a property: its getter
    try: return f'#L{inspect.getsourcelines(inspect.unwrap(obj))[1]}'
    except (TypeError, OSError): return ''

def doc_entry(target:str, ns:dict, anchors:dict, md:str|None=None) -> str:
    "A Markdown section documenting `target`: its anchor, heading, signature, docstring, source link, parameter table"
    obj = eval(target, ns)
    if md is None:
        from nbdev.showdoc import show_doc
        md = show_doc(obj)._repr_markdown_()
    md = fix_links(re.sub(r'^\s*---\s*\n', '', md))
    # show_doc outputs stored by nbdev-test (run from nbs/, where nbdev cannot find fastopt/*.py) say '#LNone'
    md = md.replace('#LNone)', _source_line(obj) + ')')
    anchor = anchors.get(target, target.lower())
    # the anchor goes under the heading, so that it lies in the section the heading opens
    md = re.sub(r'^(#+ .*)$', lambda m: f'{m.group(1)}\n\n<a class="doc-entry" id="{anchor}"></a>', md, count=1, flags=re.M)
    return f'{md}\n\n{param_table(obj)}\n'

def _directives(src:str) -> tuple[dict, str]:
    lines = src.splitlines()
    opts = {}
    for l in lines:
        m = re.match(r'#\|\s*([\w-]+)\s*:\s*(.*)$', l)
        if m: opts[m.group(1)] = m.group(2).strip().lower()
    return opts, '\n'.join(l for l in lines if not l.startswith('#|'))

def _title_cell(cell) -> dict|None:
    "nbdev moves a notebook's title and summary into front matter; put them back as a heading"
    src = ''.join(cell['source'])
    if not src.startswith('---'): return cell
    import yaml
    fm = yaml.safe_load(src.strip().strip('-')) or {}
    if 'title' not in fm: return None
    summary = f"\n\n*{fm['description']}*" if fm.get('description') else ''
    return {'cell_type': 'markdown', 'metadata': {}, 'source': f"# {fm['title']}{summary}"}

def convert(nb_path:Path, ns:dict, anchors:dict) -> dict:
    nb = json.loads(nb_path.read_text())
    cells = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] in ('markdown', 'raw'):
            if src.startswith('<!-- WARNING') or (cell['cell_type'] == 'raw' and not src.startswith('---')): continue
            cell = _title_cell(cell)
            if cell is not None: cells.append({**cell, 'source': fix_links(''.join(cell['source']))})
            continue
        if cell['cell_type'] != 'code': cells.append(cell); continue
        opts, code = _directives(src)
        m = re.fullmatch(r'\s*show_doc\(([\w.]+)\)\s*', code)
        if m:
            md = next((''.join(o['data']['text/markdown']) for o in cell.get('outputs', [])
                       if 'text/markdown' in o.get('data', {})), None)
            cells.append({'cell_type': 'markdown', 'metadata': {}, 'source': doc_entry(m.group(1), ns, anchors, md)})
            continue
        tags = [t for (k, v), t in TAGS.items() if opts.get(k) == v]
        cells.append({**cell, 'source': code, 'metadata': {'tags': tags}})
    for i, c in enumerate(cells): c.setdefault('id', f'cell-{i}')
    return {**nb, 'cells': cells}

def api_page(ns:dict, anchors:dict) -> str:
    "Every public name of fastopt, module by module, with its documentation and parameter table"
    import importlib, fastopt
    from fastopt._modidx import d
    out = ['# API reference', '', '*Every public name of `fastopt`, with its parameters.*', '']
    documented = set(api_names(anchors))
    for mod in sorted(d['syms']):
        m = importlib.import_module(mod)
        names = [n for n in getattr(m, '__all__', []) if n in fastopt.__all__]
        if not names: continue
        out += [f'## `{mod}`', '']
        for n in names:
            obj = getattr(m, n)
            if callable(obj):
                out.append(doc_entry(n, ns, anchors))
                out += [doc_entry(k, ns, anchors) for k in sorted(documented) if k.startswith(n + '.')]
            else:
                out.append(f'### {n}\n\n<a class="doc-entry" id="{anchors.get(n, n.lower())}"></a>\n\n```python\n{n} = {obj!r}\n```\n\n'
                           f'*{variable_doc(m, n)}*\n\n| Parameter | Type | Default | Details |\n|---|---|---|---|\n'
                           f'| *(a value, not a function)* | `{type(obj).__name__}` | | |\n')
    return '\n'.join(out)

def variable_doc(module, name:str) -> str:
    "The `# comment` on the line that assigns module-level variable `name`"
    import inspect
    for line in inspect.getsource(module).splitlines():
        m = re.match(rf'{name}\s*=.*#\s*(.+)$', line)
        if m: return m.group(1).strip()
    return ''

# ---- 4. Sphinx ----

CONF = '''
project = 'fastopt'
html_title = 'fastopt'
extensions = ['myst_nb']
html_theme = 'furo'
nb_execution_mode = 'off'                      # outputs are the ones stored in the notebooks
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3
html_static_path = ['_static']
mathjax_path = 'mathjax/MathJax.js?config=TeX-AMS_CHTML'   # served by the site itself: it works offline
# MathJax 2's form of what myst-nb asks of MathJax 3: typeset only math and outputs, not the whole page
mathjax2_config = {'tex2jax': {'processClass': 'tex2jax_process|mathjax_process|math|output_area'}}
exclude_patterns = ['_build', '**.ipynb_checkpoints']
suppress_warnings = ['mystnb.unknown_mime_type', 'myst.header']   # show_doc's headings are H3 under any level
nb_render_markdown_format = 'myst'
html_show_sourcelink = False
html_favicon = '_static/favicon.svg'
'''

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#2962ff"/>'
           '<text x="16" y="22" font-size="16" text-anchor="middle" fill="white" font-family="sans-serif">fo</text></svg>')

ORDER = ['optimizer', 'callbacks', 'optimizers', 'modern', 'param_groups', 'lookahead', 'wrapper', 'fastai', 'pytorch', 'fusion', 'trace', 'cpu', 'storage', 'foreach', 'triton', 'performance',
         'distributed', 'memory', 'checkpoints', 'guarantees', 'api']

def sphinx_sources(proc:Path):
    shutil.rmtree(SRC, ignore_errors=True); (SRC/'_static').mkdir(parents=True)
    ns, anchors = _namespace(), _anchors()
    for f in sorted(proc.glob('*.ipynb')):
        nb = convert(f, ns, anchors)
        if f.stem == 'index':
            pages = [p for p in ORDER if p == 'api' or (proc/f'{p}.ipynb').exists() or any(proc.glob(f'*_{p}.ipynb'))]
            nb['cells'].append({'cell_type': 'markdown', 'metadata': {},
                                'source': '```{toctree}\n:hidden:\n:maxdepth: 2\n\n' + '\n'.join(pages) + '\n```'})
        (SRC/f'{page_name(f)}.ipynb').write_text(json.dumps(nb, indent=1))
    for extra in proc.iterdir():   # images and data files the notebooks refer to
        if extra.suffix in ('.png', '.svg', '.md') and extra.is_file(): shutil.copy(extra, SRC/extra.name)
    (SRC/'api.md').write_text(api_page(ns, anchors))
    (SRC/'conf.py').write_text(CONF)
    (SRC/'_static'/'favicon.svg').write_text(FAVICON)
    if not MATHJAX.exists(): sys.exit(f"MathJax is missing: install Debian's libjs-mathjax (see DEVELOPERS.md)")
    shutil.copytree(MATHJAX, SRC/'_static'/'mathjax', symlinks=False)

def build():
    shutil.rmtree(OUT, ignore_errors=True)
    res = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html', str(SRC), str(OUT)])
    if res.returncode: sys.exit(f'sphinx-build failed ({res.returncode})')

def main():
    stage()
    proc = Path(process())
    sphinx_sources(proc)
    build()
    print(f'built {OUT}/index.html')

if __name__ == '__main__': main()
