"""Code-health figures for src/: the longest functions and the private imports across packages.

    python tools/code_metrics.py [--top N] [--root DIR]

A private cross-package import is ``from <package>._<module> import ...`` (or a ``_name``
imported from another package) where the importing file is outside that package; the
packages are projunn's direct subpackages (functional, optim, nn, harness). Shared lines
between places are counted by the separate ``duplicates`` command.
"""

from __future__ import annotations

import argparse
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def longest_functions(src: pathlib.Path, top: int) -> list[tuple[int, str]]:
    """(lines, "file:line name") of the longest functions and methods, longest first."""
    found = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            found.append((lines, f"{path.relative_to(src.parent)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)[:top]


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def private_cross_package_imports(src: pathlib.Path) -> list[str]:
    """Imports of a private module or name of one projunn subpackage from a file outside it."""
    found = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("projunn"):
                continue
            names = [alias.name for alias in node.names]
            targets = [target] if node.module else [f"{target}.{name}" for name in names]
            for full in targets:
                outside = _package_of(full) != _package_of(module)
                private_module = any(p.startswith("_") and not p.startswith("__") for p in full.split(".")[2:])
                private_name = node.module and any(n.startswith("_") for n in names)
                if outside and _package_of(full) != "projunn" and (private_module or private_name):
                    found.append(f"{path.relative_to(src)}:{node.lineno} from {full} import {', '.join(names)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--root", type=pathlib.Path, default=ROOT)
    args = parser.parse_args()
    src = args.root / "src" / "projunn"
    print("longest functions (lines):")
    for lines, where in longest_functions(src, args.top):
        print(f"  {lines:4d}  {where}")
    imports = private_cross_package_imports(src)
    print(f"private cross-package imports: {len(imports)}")
    for line in imports:
        print(f"  {line}")


if __name__ == "__main__":
    main()
