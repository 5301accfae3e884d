"""Report types whose ``repr`` is their found/why/fix text, so ``assert report.ok, report`` reads.

pytest renders a non-string assertion message with ``repr()`` and cuts it in the middle to 240
characters (2400 with ``-v``); the ``where False = ...ok`` line repeats it. Classes using the
mixin are declared ``@dataclass(repr=False)`` (the decorator would write its own ``__repr__``),
and the ``pytest_pyfunc_call`` wrapper below puts the whole text back into an assertion message
that pytest cut, for reports held in the failing frame's local variables. Stdlib and pytest only:
this module is registered as a plugin in every run.
"""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import Any

import pytest


class ReadableRepr:
    """``repr(report)`` is ``str(report)``: the text a person reads, not the fields."""

    def __repr__(self) -> str:
        return str(self)


# pytest's cut (saferepr's middle ellipsis) at the default verbosity, at -v and at -vv (none).
_PYTEST_REPR_LIMITS = (240, 2400, None)


def _cut(text: str, limit: int | None) -> str:
    """The text as pytest's saferepr shortens it to ``limit`` characters."""
    if limit is None or len(text) <= limit:
        return text
    head = max(0, (limit - 3) // 2)
    tail = max(0, limit - 3 - head)
    return text[:head] + "..." + text[len(text) - tail :]


def _innermost(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def expand_message(message: str, local_vars: dict[str, Any]) -> str:
    """Replace the cut reprs of reports in ``message`` with their whole text."""
    for name, value in local_vars.items():
        if not isinstance(value, ReadableRepr):
            continue
        full = repr(value)
        for limit in _PYTEST_REPR_LIMITS:
            cut = _cut(full, limit)
            escaped = cut.replace("\n", "\\n")
            # pytest indents the message's continuation lines by two spaces.
            shown = cut.replace("\n", "\n  ")
            if cut != full and shown in message:
                message = message.replace(shown, full.replace("\n", "\n  "), 1)
            # The explanation line ("where False = <repr>.ok") names the variable instead.
            message = message.replace(escaped, name)
    return message


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Show the whole found/why/fix text when ``assert report.ok, report`` fails."""
    try:
        return (yield)
    except AssertionError as exc:
        tb = _innermost(exc.__traceback__)
        if tb is not None and len(exc.args) == 1 and isinstance(exc.args[0], str):
            try:
                expanded = expand_message(exc.args[0], dict(tb.tb_frame.f_locals))
            except Exception:  # a nicer message is never worth hiding the user's failure
                expanded = exc.args[0]
            if expanded != exc.args[0]:
                exc.args = (expanded,)
        raise
