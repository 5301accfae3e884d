"""Stray modules that shadow a stack package: a ``torch.py`` in the project folder, a
``transformers/`` folder on PYTHONPATH. Found from the import path alone (nothing is imported).

A probe child runs ``python -m ...`` from the pytest process's working directory with the
parent's ``sys.path`` on PYTHONPATH, so it resolves imports over the working directory first
and then this process's path: the same list is searched here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_unsloth.compat.distributions import Dist, Distributions

# Distributions whose import name is not their canonical name with '-' -> '_'.
IMPORT_NAMES: dict[str, str] = {"nvidia-ml-py": "pynvml"}


def import_name(dist_key: str) -> str:
    """The top-level module a stack distribution installs (``huggingface-hub`` ->
    ``huggingface_hub``)."""
    return IMPORT_NAMES.get(dist_key, dist_key.replace("-", "_"))


@dataclasses.dataclass(frozen=True)
class Shadow:
    """``module`` resolves to ``path`` instead of the copy ``dist`` installed in its location."""

    module: str
    path: str  # the stray file or package folder imports find first
    dist: str
    version: str
    location: str  # where the installed copy lives

    def describe(self) -> str:
        """One line for a finding."""
        return (
            f"`import {self.module}` loads {self.path}, not {self.dist} {self.version} "
            f"installed in {self.location}"
        )

    def fix(self) -> str:
        """Rename the stray file (never a reinstall: the installed package is fine)."""
        return (
            f"rename or remove {self.path} (a file or folder named like a package hides the "
            f"package); do not reinstall {self.dist}"
        )


def search_path(cwd: str | None = None) -> list[str]:
    """Where a probe child looks for modules: the working directory, then this sys.path."""
    first = os.getcwd() if cwd is None else cwd
    out = [first]
    out += [p if p else first for p in sys.path]
    return list(dict.fromkeys(out))


def _entry_of(origin: str, is_package: bool) -> Path:
    """The sys.path entry a module was found in (``.../site/torch/__init__.py`` -> ``.../site``)."""
    path = Path(origin)
    return path.parent.parent if is_package else path.parent


def _same(a: Path | str, b: Path | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def find_shadow(dist: Dist, path: list[str] | None = None) -> Shadow | None:
    """A stray module hiding ``dist``'s own copy, or None.

    Only when the distribution's location really holds its module (``site/torch/`` or
    ``site/torch.py``): an editable install, whose code lives elsewhere, is never a shadow.
    """
    if not dist.location:
        return None
    name = import_name(dist.key)
    loc = Path(dist.location)
    own = [loc / name / "__init__.py", loc / f"{name}.py"]
    if not any(p.is_file() for p in own):
        own_ext = list(loc.glob(f"{name}.*.so")) + list(loc.glob(f"{name}.*.pyd"))
        if not own_ext:
            return None
    try:
        spec = PathFinder.find_spec(name, search_path() if path is None else path)
    except Exception:  # an unreadable path entry: nothing can be said
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    is_package = spec.submodule_search_locations is not None
    if _same(_entry_of(spec.origin, is_package), loc):
        return None
    where = str(Path(spec.origin).parent) if is_package else spec.origin
    return Shadow(name, where, dist.name, dist.version, dist.location)


def find_shadows(inv: Distributions, path: list[str] | None = None) -> list[Shadow]:
    """Every installed stack package hidden by a stray module, in stack order."""
    search = search_path() if path is None else path
    out = []
    for dist in inv.installed():
        found = find_shadow(dist, search)
        if found is not None:
            out.append(found)
    return out
