"""The one finding type: what was found, why it matters, how to fix it.

Environment checks fail with it (``CheckFailed`` carries one) and the GRPO setup checks report
lists of them (``grpo.Problem`` is this class), so the three fields and their rendering are
written once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding, written so a failure can print three short lines.

    ``code`` names the kind of finding for programs (``"wrong-length"``); ``severity`` says
    whether it fails a check (``"error"``) or is only reported.
    """

    found: str
    why: str = ""
    fix: str = ""
    _: dataclasses.KW_ONLY
    code: str = ""
    severity: Severity = "error"

    def format(self, indent: str = "") -> str:
        """All three lines, each prefixed by ``indent`` (a report lists many findings)."""
        return f"{indent}found: {self.found}\n{indent}why:   {self.why}\n{indent}fix:   {self.fix}"

    def render(self) -> str:
        """The lines shown under a failing check: ``why`` and ``fix`` only when given."""
        lines = [f"found: {self.found}"]
        if self.why:
            lines.append(f"why:   {self.why}")
        if self.fix:
            lines.append(f"fix:   {self.fix}")
        return "\n".join(lines)
