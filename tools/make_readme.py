"""Write README.md from nbs/index.ipynb (the docs' home page), so the two never disagree.

    python tools/make_readme.py           # write README.md
    python tools/make_readme.py --check   # exit 1 if README.md is stale

Markdown cells are copied; code cells become Python blocks followed by their text output; cells marked
`#| hide` (or `#| include: false`) and the `> summary` line's quote marker are handled as nbdev renders them.
Relative links are written relative to the notebook (`08_fusion.ipynb`, which the docs build maps to its page);
README.md lies one folder up, so they are rewritten to `nbs/08_fusion.ipynb`."""
import json, os, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def rebase_links(md:str, nb_dir:Path) -> str:
    "Relative Markdown link targets in `md`, written from `nb_dir`, rewritten to be relative to the repository root"
    def rebase(m):
        target = m.group(2)
        if re.match(r'[a-z][\w+.-]*:|[#/]', target): return m.group(0)   # URLs, mailto:, anchors, absolute paths
        return f'{m.group(1)}({Path(os.path.relpath(nb_dir/target, root)).as_posix()})'
    return re.sub(r'(\])\(([^)\s]+)\)', rebase, md)

def _hidden(src):
    opts = [l.replace(' ', '') for l in src.splitlines() if l.startswith('#|')]
    return '#|hide' in opts or '#|include:false' in opts

def _output_text(out):
    if out.get('output_type') == 'stream': return ''.join(out.get('text', ''))
    data = out.get('data', {})
    return ''.join(data.get('text/plain', '')) if 'image/png' not in data else ''

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text())
    parts = ['<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->']
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip()
        if not src or _hidden(src): continue
        if cell['cell_type'] == 'markdown': parts.append(rebase_links(src, Path(nb_path).parent))
        else:
            parts.append(f'```python\n{src}\n```')
            text = ''.join(_output_text(o) for o in cell.get('outputs', [])).rstrip()
            if text: parts.append(f'```\n{text}\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    readme = root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != render():
            sys.exit('README.md is stale: run `python tools/make_readme.py` and commit it')
        print('README.md is up to date')
    else: readme.write_text(render()); print('wrote', readme)
