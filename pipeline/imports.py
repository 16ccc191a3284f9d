"""The project files a module runs when imported, transitively.

They are found with ast. Every `import` and `from ... import` counts, except inside
`if TYPE_CHECKING:`. Imports inside functions count too, since those run as well.

There are two uses.
- dvc.yaml's deps of a stage cover its entry point's closure (tests/test_stage_deps.py).
  `python -m pipeline.imports stages.train` prints them.
- `code_digest` puts the code a stage runs into the fingerprints of resumable work (training state,
  generated shards). So work done by other code is never continued or kept."""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "experiments")


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(name: str, root: Path) -> list[Path]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts, found = name.split("."), []
    for i in range(1, len(parts)):
        init = root.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            found.append(init)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(path: Path, root: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        package = module.removesuffix(".__init__")
    names: set[str] = set()
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # submodules imported by name
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_closure(entry: str, root: Path = REPO) -> set[Path]:
    """Files (relative to `root`) that importing module `entry` (e.g. "stages.train") runs."""
    start = _module_file(entry, root)
    if start is None:
        raise ValueError(f"no module {entry} under {root}")
    todo, seen = [start, *_package_inits(entry, root)], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, root):
            found = _module_file(name, root)
            if found is not None:
                todo.append(found)
                todo.extend(_package_inits(name, root))
    return {p.relative_to(root) for p in seen}


def covering_deps(entry: str, root: Path = REPO) -> list[str]:
    """The closure as dvc.yaml deps: a folder where every Python file under it is in the closure,
    single files elsewhere."""
    closure = import_closure(entry, root)
    deps: set[str] = set()
    for path in closure:
        folder, chosen = path.parent, str(path)
        while folder != Path(".") and folder.parts[0] in PACKAGES and len(folder.parts) > 1:
            if all(p.relative_to(root) in closure for p in (root / folder).rglob("*.py")):
                chosen = str(folder)
            folder = folder.parent
        deps.add(chosen)
    return sorted(d for d in deps if not any(d.startswith(other + "/") for other in deps))


@lru_cache(maxsize=None)
def code_digest(entry: str, root: Path = REPO) -> str:
    """sha256 over the closure's paths and contents."""
    digest = hashlib.sha256()
    for path in sorted(import_closure(entry, root)):
        digest.update(path.as_posix().encode() + b"\0" + (root / path).read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        print(f"{name}:", *(f"  - {dep}" for dep in covering_deps(name)), sep="\n")
