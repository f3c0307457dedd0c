"""Fail when `nbdev-export` would change the library: the notebooks in `nbs/` are the source
of `fastopt/`, so exporting them must reproduce the committed modules byte for byte."""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
lib = root/'fastopt'

def snapshot():
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(lib.rglob('*')) if p.is_file() and '__pycache__' not in p.parts}

before = snapshot()
exporter = Path(sys.executable).with_name('nbdev-export')
subprocess.run([str(exporter)], cwd=root, check=True)
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
if changed:
    sys.exit("nbdev-export changed the library, so fastopt/ was out of step with nbs/:\n  "
             + "\n  ".join(changed) + "\nEdit the notebooks (never fastopt/*.py), export, and commit both.")
print(f"nbdev-export: fastopt/ is in step with nbs/ ({len(after)} files checked)")
