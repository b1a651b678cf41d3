"""mkdocs hook: the API reference, generated from the source tree at build time.

One page per part of the package, in the order of a study (CONTRIBUTING.md): the base modules, ``load``,
``settings``, ``run``, ``analyses``, ``studies``, ``present`` and ``commands``. Every public module of a part
(a ``.py`` file whose name does not start with ``_``) gets a section rendered by mkdocstrings from its
docstrings, so a module added to the package appears without editing this file or ``mkdocs.yml``. The page
``api/index.md`` lists every name ``import sinklens as sl`` exports (``_EXPORTS`` in ``sinklens/__init__.py``,
read with ``ast``, nothing imported), each linked to its entry: a name exported but not documented breaks
``mkdocs build --strict``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mkdocs.structure.files import File

PACKAGE = Path(__file__).resolve().parents[2] / "sinklens"

# page -> (title, what it holds, the modules or packages it documents); a package means its public modules
PARTS = {
    "base": ("Base modules", "errors, atomic writes, the result base class and the studies' defaults",
             ["sinklens.errors", "sinklens.results", "sinklens.defaults"]),
    "load": ("sinklens.load", "models (GGUF, Hugging Face directories, hub names; layers on demand), fused "
             "attention, data, the model registry", ["sinklens.load"]),
    "settings": ("sinklens.settings", "the choices every study and command shares", ["sinklens.settings"]),
    "run": ("sinklens.run", "inputs, `run_cache`, interventions, activation patching, the sink patch",
            ["sinklens.run"]),
    "analyses": ("sinklens.analyses", "one module per analysis, each returning one `Result`",
                 ["sinklens.analyses"]),
    "studies": ("sinklens.studies", "analyses composed from one circuit setup: the library entry points behind "
                "the commands", ["sinklens.studies"]),
    "present": ("sinklens.present", "pages, the explorer's views and widget, the notebooks' regeneration",
                ["sinklens.present"]),
    "commands": ("sinklens.commands", "the command line: the entry point and one module per command",
                 ["sinklens.cli", "sinklens.commands"]),
}


def public_modules(name: str) -> list[str]:
    """``name`` itself if it is a module; a package's public modules, sorted, if it is a package."""
    path = PACKAGE.parent / name.replace(".", "/")
    if not path.is_dir():
        return [name]
    return [f"{name}.{p.stem}" for p in sorted(path.glob("*.py")) if not p.stem.startswith("_")]


def package_only(name: str) -> list[str]:
    """A package's own entry: its docstring, its members left to their modules' entries."""
    return [f"::: {name}", "    options:", "      members: false", ""]


def exports() -> dict[str, tuple[str, ...]]:
    """``_EXPORTS`` of ``sinklens/__init__.py``: module -> the names ``sl.`` gives from it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise RuntimeError("sinklens/__init__.py has no _EXPORTS")


def part_page(title: str, holds: str, names: list[str]) -> str:
    lines = [f"# {title}", "", f"{holds[0].upper()}{holds[1:]}.", ""]
    for name in names:
        if (PACKAGE.parent / name.replace(".", "/")).is_dir():
            lines += package_only(name)
        for module in public_modules(name):
            lines += [f"::: {module}", ""]
    return "\n".join(lines)


def index_page() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings at build time (`mkdocs build`); the parts follow the flow of a study:",
        "",
    ]
    lines += [f"- [{title}]({page}.md): {holds}" for page, (title, holds, _) in PARTS.items()]
    lines += ["", *package_only("sinklens")]
    lines += [
        "## `import sinklens as sl`",
        "",
        "Every public name is importable from the package itself (each is imported from its module on first "
        "use). The names, by module:",
        "",
        "| module | names |",
        "|---|---|",
    ]
    for module, names in sorted(exports().items()):
        linked = ", ".join(f"[`{n}`][{module}.{n}]" for n in names)
        lines.append(f"| [`{module}`][{module}] | {linked} |")
    lines += ["", "`sl.corpus` is `sinklens.load.corpus` and `sl.attention` is `sinklens.analyses.attention`.", ""]
    return "\n".join(lines)


def on_files(files, config):
    """Add the generated pages to the site's files."""
    pages = {"api/index.md": index_page()}
    pages |= {f"api/{page}.md": part_page(*part) for page, part in PARTS.items()}
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files
