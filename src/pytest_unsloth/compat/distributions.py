"""Installed versions and declared pins, read from metadata only (nothing is imported)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from pytest_unsloth.util.versions import version_of

if TYPE_CHECKING:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

# The packages whose versions and mutual pins decide whether a fine-tuning run works.
STACK: tuple[str, ...] = (
    "torch",
    "torchvision",
    "triton",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "bitsandbytes",
    "unsloth",
    "unsloth-zoo",
    "vllm",
    "xformers",
    "flash-attn",
    "nvidia-ml-py",
)


def canonical(name: str) -> str:
    """PEP 503 normalised name (``Unsloth_Zoo`` -> ``unsloth-zoo``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass(frozen=True)
class Dist:
    """One installed distribution as its metadata declares it."""

    name: str
    version: str
    location: str
    requires: tuple[str, ...] = ()
    requires_python: str | None = None
    error: str | None = None  # set when the metadata is unreadable or incomplete
    path: str = ""  # the .dist-info folder

    @property
    def key(self) -> str:
        """Canonical name."""
        return canonical(self.name)

    def requirements(self) -> list[Requirement]:
        """Requires-Dist entries that apply here (markers evaluated, no extras requested)."""
        from packaging.requirements import InvalidRequirement, Requirement

        out = []
        for text in self.requires:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            out.append(req)
        return out


def _field(meta: md.PackageMetadata | None, key: str) -> str | None:
    """A metadata field or None (``meta[key]`` on a missing key is deprecated)."""
    if meta is None:
        return None
    values = meta.get_all(key) or []
    return str(values[0]) if values else None


def _valid_version(text: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def _read(dist: md.Distribution, wanted: str) -> Dist:
    path = getattr(dist, "_path", None)
    location = str(path.parent) if path is not None else ""
    info = str(path) if path is not None else ""
    try:
        meta = dist.metadata
        name = _field(meta, "Name") or wanted
        version = _field(meta, "Version") or ""
        requires = tuple(dist.requires or ())
        requires_python = _field(meta, "Requires-Python")
    except Exception as exc:  # corrupt METADATA must not take the session down
        return Dist(wanted, "", location, error=f"unreadable metadata: {exc}", path=info)
    error = None
    if not version:
        error = "metadata has no Version (a broken or half-removed install)"
    elif not _valid_version(version):
        error = f"metadata Version {version!r} is not a valid (PEP 440) version"
    return Dist(name, version, location, requires, requires_python, error, info)


@dataclasses.dataclass(frozen=True)
class Distributions:
    """The stack's distributions as installed: the first on sys.path wins, later ones shadow."""

    dists: Mapping[str, tuple[Dist, ...]]

    @classmethod
    def read(cls, names: Iterable[str] = STACK, extra: Iterable[str] = ()) -> Distributions:
        """Look up each name on sys.path (about 1 ms each)."""
        found: dict[str, tuple[Dist, ...]] = {}
        for name in dict.fromkeys([*names, *extra]):
            key = canonical(name)
            if key in found:
                continue
            hits: dict[str, Dist] = {}
            for d in md.distributions(name=name):
                dist = _read(d, name)
                hits.setdefault(dist.location, dist)  # a folder twice on sys.path is one install
            found[key] = tuple(hits.values())
        return cls(found)

    def get(self, name: str) -> Dist | None:
        """The distribution imports resolve to, or None when not installed."""
        hits = self.dists.get(canonical(name))
        if hits is None:
            hits = tuple(_read(d, name) for d in md.distributions(name=name))
        return hits[0] if hits else None

    def all(self, name: str) -> tuple[Dist, ...]:
        """Every install of a name, in sys.path order."""
        return self.dists.get(canonical(name), ())

    def installed(self) -> list[Dist]:
        """The winning install of every stack package present."""
        return [hits[0] for hits in self.dists.values() if hits]

    def versions(self) -> dict[str, str]:
        """``{name: version}`` of every installed stack package."""
        return {d.name: d.version for d in self.installed()}


def require_installed(names: Iterable[str], who: str) -> None:
    """Fail the current test in one line when ``who`` needs packages that are not installed."""
    missing = [n for n in names if version_of(n) is None]
    if missing:
        import pytest

        pytest.fail(
            f"{who} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed here. Fix: pip install {' '.join(missing)}",
            pytrace=False,
        )


# ----------------------------------------------------------------------------------------------
# Specifier arithmetic for fix lines.

_ORDER = {">=": 0, ">": 0, "~=": 1, "==": 1, "===": 1, "!=": 2, "<=": 3, "<": 3}


def format_specifier(spec: SpecifierSet) -> str:
    """Lower bounds first, exclusions next, upper bounds last: ``>=0.18.2,!=0.19.0,<=1.15.0``."""
    from packaging.version import InvalidVersion, Version

    def key(s: object) -> tuple[int, object]:
        op = getattr(s, "operator", "")
        try:
            v: object = Version(getattr(s, "version", "").rstrip(".*"))
        except InvalidVersion:
            v = Version("0")
        return (_ORDER.get(op, 1), v)

    return ",".join(str(s) for s in sorted(spec, key=key))


def combined_specifier(specs: Iterable[SpecifierSet]) -> SpecifierSet:
    """Intersection of several specifier sets, simplified for a readable install line.

    Only the tightest lower and upper bounds are kept, and exclusions outside them dropped:
    ``>=3.4.1`` and ``>=4.7.0`` become ``>=4.7.0``.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    parts: dict[str, None] = {}
    for spec in specs:
        for s in spec:
            parts[str(s)] = None
    full = SpecifierSet(",".join(parts))

    def ver(s: object) -> Version | None:
        try:
            return Version(str(getattr(s, "version", "")).rstrip(".*"))
        except InvalidVersion:
            return None

    lows = [s for s in full if s.operator in (">=", ">") and ver(s) is not None]
    highs = [s for s in full if s.operator in ("<=", "<") and ver(s) is not None]
    # Tightest bound; at equal versions the strict operator is the tighter one.
    low = max(lows, key=lambda s: (ver(s), s.operator == ">"), default=None)
    high = min(highs, key=lambda s: (ver(s), s.operator == "<="), default=None)
    keep = []
    for s in full:
        v = ver(s)
        if s in lows or s in highs:
            if s is low or s is high:
                keep.append(str(s))
        elif (
            s.operator == "!="
            and v is not None
            and (
                (low is not None and v < ver(low)) or (high is not None and v > ver(high))  # type: ignore[operator]
            )
        ):
            continue
        else:
            keep.append(str(s))
    return SpecifierSet(",".join(keep))


def obviously_empty(spec: SpecifierSet) -> bool:
    """True when the lower bounds exceed the upper bounds, so no version can satisfy all."""
    from packaging.version import InvalidVersion, Version

    lows: list[tuple[Version, bool]] = []
    highs: list[tuple[Version, bool]] = []
    for s in spec:
        try:
            v = Version(s.version.rstrip(".*"))
        except InvalidVersion:
            continue
        if s.operator in (">=", ">"):
            lows.append((v, s.operator == ">"))
        elif s.operator in ("<=", "<"):
            highs.append((v, s.operator == "<"))
        elif s.operator == "==" and not s.version.endswith("*"):
            lows.append((v, False))
            highs.append((v, False))
    if not lows or not highs:
        return False
    low, low_strict = max(lows)
    high, high_strict = min(highs)
    return low > high or (low == high and (low_strict or high_strict))


def pip_install_line(name: str, spec: SpecifierSet) -> str:
    """A copy-pasteable install command for one requirement."""
    text = format_specifier(spec)
    return f"pip install '{name}{text}'" if text else f"pip install '{name}'"


# ----------------------------------------------------------------------------------------------
# Fix lines that keep what works in place.

# Packages built against one torch release (or pinned by it): an install line for anything else
# pins their installed versions so pip finds builds for them or fails without changing them.
KEEP_IN_PLACE: tuple[str, ...] = ("torch", "torchvision", "triton")


def base_version(version: str) -> str:
    """``2.11.0+cu130`` -> ``2.11.0`` (``==2.11.0`` matches every local build of it)."""
    return version.split("+", 1)[0]


def keep_pins(installed: Mapping[str, str], installing: Iterable[str]) -> list[str]:
    """``torch==X`` etc. for each installed KEEP_IN_PLACE package not being installed itself."""
    moving = {canonical(n) for n in installing}
    have = {canonical(k): v for k, v in installed.items() if v}
    return [
        f"{name}=={base_version(have[name])}"
        for name in KEEP_IN_PLACE
        if name in have and name not in moving
    ]


def safe_install_line(
    requirements: Iterable[tuple[str, SpecifierSet | None]], installed: Mapping[str, str]
) -> tuple[str, str]:
    """(command, note): ``pip install 'xformers>=0.0.27' 'torch==2.11.0'`` and why it pins.

    The note is empty when nothing needed pinning (torch is not installed or is the target).
    """
    reqs = list(requirements)
    words = [f"'{name}{format_specifier(spec) if spec else ''}'" for name, spec in reqs]
    pins = keep_pins(installed, [n for n, _ in reqs])
    line = "pip install " + " ".join(words + [f"'{p}'" for p in pins])
    if not pins:
        return line, ""
    note = (
        f"the line pins the installed {', '.join(pins)} so pip picks a build made for "
        "them or fails without replacing them"
    )
    return line, note


def keep_in_place(command: str, installed: Mapping[str, str]) -> tuple[str, str]:
    """Append keep-pins to a plain ``pip install ...`` fix (from a data table), with the note."""
    import shlex

    if not command.startswith("pip install ") or "&&" in command or ";" in command:
        return command, ""
    try:
        words = shlex.split(command)[2:]
    except ValueError:
        return command, ""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for w in words:
        if w.startswith("-"):
            continue
        try:
            names.append(Requirement(w).name)
        except InvalidRequirement:
            return command, ""
    pins = keep_pins(installed, names)
    if not pins:
        return command, ""
    note = (
        f"the line pins the installed {', '.join(pins)} so pip picks a build made for "
        "them or fails without replacing them"
    )
    return command + " " + " ".join(f"'{p}'" for p in pins), note


# ----------------------------------------------------------------------------------------------
# Requirements of extras whose own packages are installed.

_EXTRA_NAME = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")
# Extras for a package's own development: their pins describe its CI, not its users.
_DEV_EXTRAS = re.compile(
    r"^(dev|test|tests|testing|quality|docs?|all|benchmarks?|.*[-_](dev|test.*))$"
)


def active_extras(dist: Dist, is_installed: Callable[[str], bool]) -> list[tuple[Requirement, str]]:
    """``(requirement, extra)`` of every extra whose packages are all installed.

    trl's ``vllm`` extra pins ``vllm>=0.22.0,<=0.31.0``: once vLLM (and the extra's other
    packages) is installed next to trl, that range applies even though nobody typed
    ``pip install trl[vllm]``. Development extras (dev, test, quality, docs, all) are ignored.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    groups: dict[str, list[Requirement]] = {}
    for text in dist.requires:
        names = _EXTRA_NAME.findall(text)
        if not names:
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        for extra in dict.fromkeys(names):
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                groups.setdefault(extra, []).append(req)
    out = []
    for extra, reqs in groups.items():
        if _DEV_EXTRAS.match(extra):
            continue
        if all(is_installed(r.name) for r in reqs):
            out += [(r, extra) for r in reqs]
    return out
