"""The README's library example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(monkeypatch):
    monkeypatch.chdir(README.parent)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        inst = namespace["inst"]
        assert inst.masks.shape[1:] == (200, 300) and len(inst) <= 100


def test_architecture_doc_maps_every_module():
    root = README.parent
    text = (root / "docs" / "architecture.md").read_text()
    modules = sorted(
        p.relative_to(root).as_posix() for p in (root / "uniinst").rglob("*.py") if p.name != "__init__.py"
    )
    assert modules
    assert [m for m in modules if f"`{m}`" not in text] == []
