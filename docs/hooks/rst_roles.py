"""Griffe extension for the API reference: the docstrings' reST habits, in Markdown.

dynwire's docstrings are Google style with a few reStructuredText forms that Markdown does not
read: roles (``:func:`load_model```, ``:class:`~dynwire.GraphStage```, ``:mod:`.stats```) and a
paragraph ending in ``::`` before an indented code block. Roles become cross-references
(``[`load_model`][dynwire.deploy.rebuild.load_model]``): the target is resolved against the
documented object's own module and package first, as Sphinx does. A target the site renders
(a public name of one of the ``modules`` the API pages show, or a member of one) becomes a link;
one that exists but is not rendered (a private helper) becomes code; one that does not exist at
all is a warning, so ``mkdocs build --strict`` fails on a role that points nowhere. ``Text::``
becomes ``Text:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_logger = griffe.get_logger("griffe.rst_roles")

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+?)`")


def _candidates(target: str, obj: griffe.Object) -> list[str]:
    """Dotted paths a role's target may mean, most specific first."""
    if target.startswith("."):  # relative to the documented module's package
        module = obj if obj.is_module else obj.module
        is_init = (
            module.filepath is not None
            and not isinstance(module.filepath, list)
            and module.filepath.name == "__init__.py"
        )
        base = module.path if is_init else module.path.rpartition(".")[0]
        up = len(target) - len(target.lstrip("."))
        parts = base.split(".")
        parts = parts[: len(parts) - (up - 1)] if up > 1 else parts
        return [".".join(parts + [target.lstrip(".")])]
    out = []
    scope: griffe.Object | None = obj
    while scope is not None:  # the object's own members, its module's, each package up
        out.append(f"{scope.path}.{target}")
        scope = scope.parent
    out.append(target)
    return out


class RstRoles(griffe.Extension):
    """Rewrite reST roles and ``::`` in every docstring griffe loads."""

    def __init__(self, modules: list[str] | None = None) -> None:
        super().__init__()
        self._objects: list[griffe.Object] = []
        self._modules = list(modules or [])
        self._rendered: set[str] = set()

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            self._objects.append(obj)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._rendered = self._rendered_paths(pkg)
        for obj in self._objects:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj, pkg)
        self._objects.clear()

    def _rendered_paths(self, pkg: griffe.Module) -> set[str]:
        """Canonical paths of what the API pages show: the modules, their public names, their members."""
        out: set[str] = set()

        def add(obj: Any, depth: int) -> None:
            try:
                target = obj.final_target if isinstance(obj, griffe.Alias) else obj
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return
            if not target.path.startswith(pkg.path + ".") and target.path != pkg.path:
                return
            out.add(target.path)
            if depth and target.is_class:
                for name, member in target.members.items():
                    if not name.startswith("_"):
                        add(member, depth - 1)

        for path in self._modules:
            mod = _lookup(pkg, path)
            if mod is None:
                continue
            out.add(mod.path)
            for member in mod.members.values():
                if member.is_public and not member.is_module:  # submodules get no section of their own
                    add(member, 1)
        return out

    @staticmethod
    def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
        """The canonical path of the first candidate that exists in the package, else None."""
        for path in _candidates(target, obj):
            if not (path == pkg.path or path.startswith(pkg.path + ".")):
                continue
            try:
                found = _lookup(pkg, path)
                if found is not None:
                    return found.final_target.path if isinstance(found, griffe.Alias) else found.path
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        return None

    def _rewrite(self, text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
        def role(m: re.Match[str]) -> str:
            short, target = m.group(1) == "~", m.group(2).strip()
            shown = target.lstrip(".").rsplit(".", 1)[-1] if short or target.startswith(".") else target
            path = self._resolve(target, obj, pkg)
            if path is None:
                if target.startswith((".", pkg.path + ".")):  # a name of this package that does not exist: a typo
                    _logger.warning(f"{obj.relative_filepath}:{obj.lineno}: {m.group(0)} points nowhere in {pkg.path}")
                return f"`{shown}`"
            if path not in self._rendered:
                return f"`{shown}`"  # exists, but no page shows it (a private helper)
            return f"[`{shown}`][{path}]"

        text = _ROLE.sub(role, text)
        return re.sub(r"(\S)::(\s*\n)", r"\1:\2", text)


def _lookup(pkg: griffe.Module, path: str) -> griffe.Object | None:
    obj: Any = pkg
    for part in path.split(".")[1:]:
        members = obj.members if not isinstance(obj, griffe.Alias) else obj.final_target.members
        if part not in members:
            return None
        obj = members[part]
    return obj
