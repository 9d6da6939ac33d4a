"""The package's structure in figures, read from its source (nothing is imported): modules, import edges between
them (module level and inside functions), the longest chain of imports, imports that run against the layers of
subpackages, cycles, and the longest functions.

    python benchmarks/structure.py                    # this checkout
    python benchmarks/structure.py --root /other/checkout

The layers, lowest first: what a subpackage may import lies in its own layer or below. A package without these
subpackages (an older checkout) is one flat layer.
"""

from __future__ import annotations

import argparse
import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "flare_c2f_extensions"
LAYERS = [
    {"labels", "errors", "paths", "version", "options"},
    {"io", "transforms", "synthetic"},
    {"cascade", "evaluation"},
    {"runs", "releases"},
    {"training"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, absolute or relative, anywhere in the file."""
    found = set()
    package = name if name.endswith("__init__") else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            for alias in node.names:
                for candidate in (f"{base}.{alias.name}", base):
                    if candidate in modules:
                        found.add(candidate)
                        break
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for end in range(len(parts), 0, -1):
                    if ".".join(parts[:end]) in modules:
                        found.add(".".join(parts[:end]))
                        break
    found.discard(name)
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for number, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return number
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=3, help="how many of the longest functions to list")
    args = parser.parse_args()
    root = Path(args.root)
    files = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(path, root): path for path in files}
    modules = set(names)
    trees = {name: ast.parse(path.read_text()) for name, path in names.items()}
    edges = {name: imported_modules(tree, name, modules) for name, tree in trees.items()}

    @lru_cache(maxsize=None)
    def depth(module: str, seen: frozenset = frozenset()) -> int:
        below = [depth(other, seen | {module}) for other in edges[module] if other not in seen | {module}]
        return 1 + max(below, default=0)

    layered = any(layer_of(name) is not None for name in modules if name.count(".") >= 2)
    upward = sorted(
        (a, b) for a, targets in edges.items() for b in targets
        if layered and layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)
    )
    cycles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges[b]})
    functions = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    functions.sort(reverse=True)
    packages = sorted({name.rsplit(".", 1)[0] for name in modules if name.count(".") >= 2})
    listed = ": " + ", ".join(p.split(".")[1] for p in packages) if packages else ""
    print(f"modules: {len(modules)} ({len(packages)} subpackages{listed})")
    print(f"import edges between modules: {sum(len(t) for t in edges.values())}")
    print(f"longest import chain: {max(depth(name) for name in modules)} modules")
    print(f"imports against the layers: {len(upward) if layered else 'n/a (one flat package)'}")
    for a, b in upward:
        print(f"  {a} -> {b}")
    print(f"pairs of modules importing each other: {len(cycles)}")
    for length, function in functions[: args.top]:
        print(f"longest function: {function}, {length} lines")


if __name__ == "__main__":
    main()
