"""Write docs/api.md, the API reference, from the docstrings of projunn's public names.

The reference covers every name in the ``__all__`` of ``projunn.functional``,
``projunn.optim``, ``projunn.nn``, ``projunn.models`` and ``projunn.robust`` (the public API, see
CHANGELOG.md), and the
"Note [...]" sections of the modules behind them, which the docstrings refer to.
It uses only the standard library and the package's own docstrings, so the
page is a pure function of the source: tests/test_docs.py regenerates it and
compares.

    python tools/gen_api_docs.py            # rewrite docs/api.md
    python tools/gen_api_docs.py --check    # exit 1 if docs/api.md is out of date
    python tools/gen_api_docs.py --output PATH
    python tools/gen_api_docs.py --git-ref HEAD   # from the source as committed, not the work tree

Every module file under the three packages counts, tracked or not, so in a work
tree holding uncommitted modules ``--git-ref HEAD`` gives the page that matches
the commit.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import typing

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "api.md"
MODULES = ("projunn.functional", "projunn.optim", "projunn.nn", "projunn.models", "projunn.robust")
# "Note [Title]" followed by a line of dashes, in a module docstring (see STYLE: named invariants).
_NOTE = re.compile(r"^Note \[(?P<title>[^\]]+)\]\n-+\n", flags=re.MULTILINE)
_NOTE_REFERENCE = re.compile(r"Note \[(?P<title>[^\]]+)\]")


def _doc(obj) -> str:
    """The object's own docstring, dedented; never one inherited from a base class (torch's change)."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def _signature(obj) -> str:
    """The call signature without annotations (they are in the docstrings' Args)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _note_heading(title: str) -> str:
    return f"Note [{title}]"


def _text_block(text: str) -> list[str]:
    return ["```text", *text.splitlines(), "```", ""]


def _note_links(text: str, notes: dict[str, tuple[str, str]]) -> list[str]:
    titles = list(dict.fromkeys(m["title"] for m in _NOTE_REFERENCE.finditer(text)))
    links = [f"[{_note_heading(t)}](#{_slug(_note_heading(t))})" for t in titles if t in notes]
    return [f"See {', '.join(links)}.", ""] if links else []


#: Private modules at the package root that the public names' Notes also live in.
SHARED_MODULES = ("projunn._constraints", "projunn._rows")


def collect_notes(package_names=MODULES + SHARED_MODULES) -> dict[str, tuple[str, str]]:
    """{title: (module name, text)} for every Note in the module docstrings of the packages' modules."""
    notes: dict[str, tuple[str, str]] = {}
    for package_name in package_names:
        package = importlib.import_module(package_name)
        # A plain module (no __path__) has no submodules; its Notes are in the package's modules.
        submodules = sorted(info.name for info in pkgutil.iter_modules(getattr(package, "__path__", [])))
        names = [package_name, *(f"{package_name}.{name}" for name in submodules)]
        for name in names:
            doc = _doc(importlib.import_module(name))
            matches = list(_NOTE.finditer(doc))
            for match, following in zip(matches, [*matches[1:], None]):
                end = following.start() if following else len(doc)
                notes[match["title"]] = (name, doc[match.end() : end].strip())
    return notes


def _members(cls) -> list[tuple[str, object]]:
    """Public members defined by the class itself, in source order. Overrides of a base class's
    method (``forward``, ``extra_repr`` of torch modules) are listed only when they say more."""
    members = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        inherited = any(name in vars(base) for base in cls.__mro__[1:])
        value = getattr(cls, name)
        if inherited and not _doc(raw if isinstance(raw, property) else value):
            continue
        members.append((name, raw))
    return members


def _signature_block(text: str) -> list[str]:
    return ["```python", text, "```", ""]


def _documented(doc: str, notes) -> list[str]:
    return (_text_block(doc) if doc else []) + _note_links(doc, notes)


def _render_member(owner: str, name: str, raw, notes) -> list[str]:
    heading = [f"#### {owner}.{name}", ""]
    if isinstance(raw, property):
        return heading + _signature_block(f"{owner}.{name}  # property") + _documented(_doc(raw), notes)
    if isinstance(raw, (staticmethod, classmethod)) or callable(raw):
        function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        signature = _signature(function)
        if not isinstance(raw, staticmethod):
            signature = re.sub(r"^\((self|cls)(, )?", "(", signature)
        prefix = "@classmethod\n" if isinstance(raw, classmethod) else ""
        return heading + _signature_block(f"{prefix}{owner}.{name}{signature}") + _documented(_doc(function), notes)
    return heading + _signature_block(f"{owner}.{name} = {raw!r}")


def _render_name(module_name: str, name: str, obj, notes) -> list[str]:
    qualified = f"{module_name}.{name}"
    heading = [f"### {qualified}", ""]
    if typing.get_origin(obj) is typing.Literal:
        choices = ", ".join(map(repr, typing.get_args(obj)))
        return [
            *heading,
            *_signature_block(f"{qualified} = Literal[{choices}]"),
            f"A type alias: the strings accepted; `typing.get_args({qualified})` lists them at run time.",
            "",
        ]
    if getattr(obj, "__name__", name) != name and (inspect.isclass(obj) or inspect.isfunction(obj)):
        target = f"{module_name}.{obj.__name__}"
        return [*heading, f"Alias of [`{target}`](#{_slug(target)}): the same object under a second name.", ""]
    if inspect.isclass(obj):
        lines = heading + _signature_block(f"class {qualified}{_signature(obj)}") + _documented(_doc(obj), notes)
        for member_name, raw in _members(obj):
            lines += _render_member(f"{module_name}.{name}", member_name, raw, notes)
        return lines
    if callable(obj):
        return heading + _signature_block(f"{qualified}{_signature(obj)}") + _documented(_doc(obj), notes)
    return heading + _signature_block(f"{qualified} = {obj!r}")


def render() -> str:
    """The whole reference page as one string."""
    notes = collect_notes()
    lines = [
        "<!-- Generated by tools/gen_api_docs.py from the docstrings. Do not edit by hand: edit the",
        "     docstrings and run `python tools/gen_api_docs.py`; tests/test_docs.py checks it is current. -->",
        "",
        "# API reference",
        "",
        "Every public name of `projunn.functional`, `projunn.optim`, `projunn.nn`, `projunn.models` and",
        "`projunn.robust`",
        "(their `__all__`), with its signature and docstring, followed by the Notes the docstrings refer",
        "to. These names are the public Python API of the version policy in [CHANGELOG.md](../CHANGELOG.md).",
        "The README shows how they fit together; `help(name)` shows the same text.",
        "",
    ]
    modules = [importlib.import_module(name) for name in MODULES]
    for module in modules:
        names = ", ".join(f"`{name}`" for name in module.__all__)
        lines.append(f"- [`{module.__name__}`](#{_slug(module.__name__)}): {names}")
    lines.append(f"- [Notes](#notes): {len(notes)} notes on the maths and the design")
    lines.append("")
    for module in modules:
        lines += [f"## {module.__name__}", ""]
        doc = _doc(module)
        if doc:
            lines += [doc, ""]
        for name in module.__all__:
            lines += _render_name(module.__name__, name, getattr(module, name), notes)
    lines += [
        "## Notes",
        "",
        "Named explanations in the module docstrings; the docstrings above refer to them by title.",
        "",
    ]
    for title, (module_name, text) in sorted(notes.items(), key=lambda item: (item[1][0], item[0])):
        lines += [f"### {_note_heading(title)}", "", f"In `{module_name}`.", "", *_text_block(text)]
    text = "\n".join(line.rstrip() for line in lines).rstrip("\n") + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the API reference (docs/api.md) from the docstrings.")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT, help="default: docs/api.md")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    parser.add_argument("--git-ref", help="document the source of src/ as committed at this git revision")
    args = parser.parse_args(argv)
    if args.git_ref:
        return _main_at(args.git_ref, args)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is out of date: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


def _main_at(ref: str, args: argparse.Namespace) -> int:
    """Run this script in a fresh interpreter on ``src/`` as committed at ``ref``."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the filter exists from 3.10.12 on
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, **safe)
        (pathlib.Path(folder) / "tools").mkdir()
        shutil.copy(__file__, pathlib.Path(folder) / "tools" / "gen_api_docs.py")
        command = [sys.executable, str(pathlib.Path(folder) / "tools" / "gen_api_docs.py")]
        command += ["--output", str(args.output.resolve())] + (["--check"] if args.check else [])
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))  # document this checkout, installed or not
    sys.exit(main())
