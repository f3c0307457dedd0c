"""Edit notebooks as plain text: convert between `nbs/*.ipynb` and a percent-format script.

    python tools/nbpy.py to-py nbs/01_optimizer.ipynb /tmp/01_optimizer.py
    python tools/nbpy.py to-nb /tmp/01_optimizer.py nbs/01_optimizer.ipynb

In the script, `# %%` starts a code cell and `# %% [markdown]` a Markdown cell whose lines
carry a leading `# `. Outputs are not kept: run `nbdev-test NB --save` afterwards to
execute the notebook and store fresh outputs, then `nbdev-clean`."""
import hashlib, json, sys
from pathlib import Path

def nb_to_py(nb_path, py_path):
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'markdown':
            parts.append('# %% [markdown]\n' + '\n'.join(('# ' + l).rstrip() for l in src.split('\n')))
        else: parts.append('# %%\n' + src)
    Path(py_path).write_text('\n\n'.join(parts) + '\n')

def _cell(kind, lines, cell_id):
    while lines and not lines[-1].strip(): lines.pop()
    while lines and not lines[0].strip(): lines.pop(0)
    if kind == 'markdown': lines = [l[2:] if l.startswith('# ') else l[1:] if l.startswith('#') else l for l in lines]
    src = [l + '\n' for l in lines]
    if src: src[-1] = src[-1][:-1]
    cell = dict(cell_type=kind, id=cell_id, metadata={}, source=src)
    if kind == 'code': cell.update(execution_count=None, outputs=[])
    return cell

def py_to_nb(py_path, nb_path):
    cells, kind, lines = [], None, []
    def cell_id(): return hashlib.sha1(f'{Path(nb_path).name}:{len(cells)}'.encode()).hexdigest()[:8]  # stable
    for line in Path(py_path).read_text().split('\n'):
        if line.startswith('# %%'):
            if kind: cells.append(_cell(kind, lines, cell_id()))
            kind, lines = ('markdown' if '[markdown]' in line else 'code'), []
        else: lines.append(line)
    if kind: cells.append(_cell(kind, lines, cell_id()))
    nb = dict(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    Path(nb_path).write_text(json.dumps(nb, indent=1) + '\n')

if __name__ == '__main__':
    cmd, src, dst = sys.argv[1:4]
    {'to-py': nb_to_py, 'to-nb': py_to_nb}[cmd](src, dst)
