"""The import arrows of the design: `ingestion`, `training` and `retrieval` may import `ecgplat`;
`retrieval` may also import `training`; `ecgplat` imports none of them except in `ecgplat/cli`.
Every import statement counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("ecgplat", "ingestion", "training", "retrieval")
ALLOWED = {
    "ecgplat": {"ecgplat"},
    "ingestion": {"ecgplat", "ingestion"},
    "training": {"ecgplat", "training"},
    "retrieval": {"ecgplat", "training", "retrieval"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every absolute import in one file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_the_scanner_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from retrieval.index import X\n    import training\n")
    assert imported_packages(f) == {("retrieval", 4), ("training", 5)}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "ecgplat" and "cli" in path.relative_to(ROOT / package).parts:
            continue  # the command line composes every layer
        for target, line in sorted(imported_packages(path)):
            if target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)
