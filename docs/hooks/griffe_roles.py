"""Griffe extension for the API reference: the docstrings' Sphinx roles as links.

sinklens' docstrings name other objects the Sphinx way (``:func:`~sinklens.studies.scan.run_scan```,
``:class:`Settings```), which Markdown would show as literal text. This rewrites each role, once the package
is loaded, into a cross-reference to the object's entry when the name leads to a public object of the package
(a full path; a name of ``import sinklens as sl``; a member of the docstring's class or module, or a name
imported there), and into plain code otherwise. A leading ``~`` shows the last component only, as in Sphinx.
Nothing in the package changes: only the text mkdocstrings renders.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from griffe import Extension, Module, Object

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const):`(~?)([\w.]+)(\(\))?`")


def _exports(root: Module) -> dict[str, str]:
    """``sl.<name>`` -> the module that defines it, from ``_EXPORTS`` in the package's ``__init__.py``."""
    source = Path(str(root.filepath)).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS":
            table = ast.literal_eval(node.value)
            return {name: module for module, names in table.items() for name in names}
    return {}


def _lookup(root: Module, path: str) -> Object | None:
    """The object at ``path`` (aliases followed), if it is public and in the package."""
    for _ in range(5):  # alias chains are short
        parts = path.split(".")
        if parts[0] != root.name or any(part.startswith("_") for part in parts[1:]):
            return None
        try:
            found = root[".".join(parts[1:])] if len(parts) > 1 else root
        except (KeyError, ValueError, AttributeError):
            return None
        if not found.is_alias:
            return found
        path = found.target_path
    return None


def _scopes(owner: Object) -> list[str]:
    """Where a short name in ``owner``'s docstring may live: its class (if any), then its module."""
    scopes = []
    if owner.is_class:
        scopes.append(owner.path)
    elif owner.parent is not None and owner.parent.is_class:
        scopes.append(owner.parent.path)
    scopes.append(owner.module.path)
    return scopes


class SphinxRoles(Extension):
    """Rewrite the roles of every docstring in the package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        exports = _exports(pkg)
        seen: set[int] = set()

        def target(owner: Object, name: str) -> str | None:
            if name.startswith(f"{pkg.name}."):
                short = name[len(pkg.name) + 1 :]
                candidates = [f"{exports[short]}.{short}"] if short in exports else [name]
            else:
                first = name.split(".")[0]
                candidates = [f"{scope}.{name}" for scope in _scopes(owner)]
                candidates += [f"{exports[first]}.{name}"] if first in exports else []
                candidates.append(f"{pkg.name}.{name}")
            for candidate in candidates:
                found = _lookup(pkg, candidate)
                if found is not None:
                    return found.path
            return None

        def replace(owner: Object, match: re.Match) -> str:
            short, name, call = match.group(1), match.group(2), match.group(3) or ""
            shown = f"`{(name.rsplit('.', 1)[-1] if short else name)}{call}`"
            path = target(owner, name)
            return f"[{shown}][{path}]" if path else shown

        def visit(obj: Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m: replace(obj, m), obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
