"""pytest-unsloth's entry point (``pytest11``, named ``unsloth``): options, configure, header.

Imported by every pytest run in the environment, so it imports only the standard library and
pytest; everything else loads inside the hooks that need it. ``pytest_configure`` registers the
plugin's parts: fixtures and markers always, the ``--unsloth-env`` parts only with the flag.
"""

from __future__ import annotations

import importlib

import pytest

# Modules registered as plugins at configure time: their fixtures, markers and hooks.
_PLUGIN_MODULES = (
    ("unsloth-markers", "pytest_unsloth.markers"),
    ("unsloth-pinning", "pytest_unsloth.pinning"),
    ("unsloth-fixtures", "pytest_unsloth.fixtures"),
    ("unsloth-grpo-fixture", "pytest_unsloth.grpo.fixture"),
    ("unsloth-scratch", "pytest_unsloth.util.scratch"),
    ("unsloth-readable", "pytest_unsloth.util.readable"),
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the hook specifications (``pytest_unsloth_checks`` and friends)."""
    from pytest_unsloth.checks import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--unsloth-*`` options and ``unsloth_*`` ini keys."""
    from pytest_unsloth.settings import addoptions

    addoptions(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Resolve the settings once and register the parts of the plugin."""
    from pytest_unsloth.settings import SETTINGS_KEY, resolve

    settings = resolve(config)
    config.stash[SETTINGS_KEY] = settings
    config.addinivalue_line(
        "markers", "unsloth_env: an environment check item made by pytest --unsloth-env"
    )
    pm = config.pluginmanager
    for name, module in _PLUGIN_MODULES:
        if not pm.has_plugin(name):
            pm.register(importlib.import_module(module), name)
    if settings.env:
        from pytest_unsloth.checks.builtin import BuiltinChecks
        from pytest_unsloth.checks.collection import EnvCollection

        pm.register(BuiltinChecks(), "unsloth-builtin-checks")
        pm.register(EnvCollection(config, settings), "unsloth-collection")
        pm.register(importlib.import_module("pytest_unsloth.checks.items"), "unsloth-items")
        if not hasattr(config, "workerinput"):
            # The table and the JSON report are written once, by the xdist controller (or the
            # only process); workers attach each check's record to its report instead.
            from pytest_unsloth.checks.report import Reporter

            pm.register(Reporter(config), "unsloth-reporter")


def pytest_report_header(config: pytest.Config) -> str | None:
    """One line with GPUs, driver and torch (with --unsloth-env or -v)."""
    from pytest_unsloth.settings import SETTINGS_KEY

    settings = config.stash.get(SETTINGS_KEY, None)
    if not (settings and settings.env) and config.get_verbosity() < 1:
        return None
    from pytest_unsloth.checks.report import header_line

    try:
        return header_line()
    except Exception as exc:  # the header must never be what breaks a run
        return f"unsloth: environment unreadable ({type(exc).__name__}: {exc})"
