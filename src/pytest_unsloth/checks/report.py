"""Header line, terminal summary table, JSON report and GitHub step summary."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_unsloth.checks.items import PROPERTY, get_context

if TYPE_CHECKING:
    from pytest_unsloth.compat.distributions import Distributions
    from pytest_unsloth.gpu import NvmlSnapshot

SCHEMA = "pytest-unsloth/1"
STATUS_WORD = {"passed": "passed", "failed": "FAILED", "skipped": "skipped", "error": "ERROR"}


def header_line() -> str:
    """One line: GPUs, driver, torch, CUDA; from NVML and metadata only (no torch import)."""
    from pytest_unsloth.gpu import read_snapshot
    from pytest_unsloth.util.versions import version_of

    version = version_of("torch")
    torch = "not installed" if version is None else version or "(unreadable metadata)"
    nvml = read_snapshot()
    if nvml.available and nvml.devices:
        names: dict[str, int] = {}
        for d in nvml.visible or nvml.devices:
            names[d.name] = names.get(d.name, 0) + 1
        gpus = ", ".join(f"{n}x {name}" for name, n in names.items())
        gpu_part = (
            f"GPUs: {gpus} (driver {nvml.driver_version}, CUDA {nvml.cuda_driver_version_str})"
        )
    else:
        gpu_part = f"no NVIDIA GPU ({nvml.error or 'NVML reports 0 devices'})"
    return f"unsloth: {gpu_part}; torch {torch}"


def _ordered(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in check order (xdist workers finish in any order)."""
    return sorted(records.values(), key=lambda r: (r.get("order", 1 << 30), r["name"]))


def _record(value: object) -> dict[str, Any] | None:
    """A check record from its junit property, or None when it is not one of ours."""
    try:
        record = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("name"), str) and "status" in record:
        return record
    return None


class Reporter:
    """Collects check records from reports (so they survive xdist) and writes the outputs.

    Registered on the xdist controller only (or the single process), as junitxml's reporter is.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, dict[str, Any]] = {}
        self.report_error: str | None = None

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the record each check item attached to its call report."""
        for key, value in report.user_properties:
            # Only check items write this property; a user's test may record one of the same
            # name (record_property), which must not become a row or break the summary.
            if key == PROPERTY and report.nodeid.startswith("unsloth-env::"):
                record = _record(value)
                if record is not None:
                    self.records[record["name"]] = record
        if (
            report.when == "call"
            and report.nodeid.startswith("unsloth-env::")
            and report.failed
            and report.nodeid.split("::", 1)[1] not in self.records
        ):
            name = report.nodeid.split("::", 1)[1]
            self.records[name] = {
                "name": name,
                "status": "error",
                "message": str(report.longrepr).splitlines()[-1][:300],
            }

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The table of checks."""
        if not self.records:
            return
        tr = terminalreporter
        tr.write_sep("=", "unsloth environment")
        width = max(len(n) for n in self.records) + 2
        verbose = self.config.get_verbosity() > 0
        for rec in _ordered(self.records):
            status = STATUS_WORD.get(rec["status"], rec["status"])
            markup = (
                {"red": True}
                if rec["status"] in ("failed", "error")
                else ({"yellow": True} if rec["status"] == "skipped" else {"green": True})
            )
            lines = fit_detail(
                rec, self.config.get_terminal_writer().fullwidth - width - 9, verbose
            )
            tr.write(f"{rec['name']:<{width}}")
            tr.write(f"{status:<8}", **markup)
            tr.line(f" {lines[0]}")
            for more in lines[1:]:
                tr.line(f"{'':<{width + 9}}{more}")
        if self.config.get_verbosity() > 0:
            from pytest_unsloth.compat.constraints import package_report, report_lines

            tr.write_sep("-", "unsloth packages: version, required by, verdict")
            try:
                lines = report_lines(package_report(get_context(self.config).inventory))
            except Exception as exc:  # the summary must survive any environment
                lines = [f"(not available: {type(exc).__name__}: {exc})"]
            for line in lines:
                tr.line(line, red=" outside " in f" {line} ")
        path = self.config.stash.get(REPORT_PATH_KEY, None)
        if path:
            tr.line(f"unsloth: JSON report written to {path}")
        if self.report_error:
            tr.line(f"unsloth: {self.report_error}", red=True)

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write the JSON report and the GitHub step summary."""
        from pytest_unsloth.settings import get_settings

        settings = get_settings(self.config)
        if settings.report_path:
            path = Path(settings.report_path)
            if not path.is_absolute():
                path = Path(self.config.invocation_params.dir) / path
            # The checks' own inventory and NVML snapshot (read once per session; under xdist
            # the controller reads them here), so the report shows what the checks saw.
            ctx = get_context(self.config)
            data = build_json(_ordered(self.records), int(exitstatus), ctx.inventory, ctx.nvml)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(data, indent=2, default=str) + "\n", "utf-8")
                self.config.stash[REPORT_PATH_KEY] = str(path)
            except OSError as exc:
                self.report_error = (
                    f"cannot write the JSON report to {path} "
                    f"({settings.source('report_path')}): {exc.strerror or exc}"
                )
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary and self.records:
            try:
                with open(summary, "a", encoding="utf-8") as fh:
                    fh.write(markdown_summary(_ordered(self.records)))
            except OSError:
                pass


REPORT_PATH_KEY = pytest.StashKey[str]()


def _one_line(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# The detail column never gets narrower than this, however narrow the terminal.
_MIN_DETAIL = 30


def fit_detail(rec: dict[str, Any], room: int, verbose: bool) -> list[str]:
    """The detail column: cut to ``room`` characters, or whole (one line, for grep) with ``-v``."""
    room = max(room, _MIN_DETAIL)
    message = " ".join(str(rec.get("message", "")).split())
    origin = _probe_origin(rec)
    if verbose:
        return [message + origin]
    # The message is cut before the origin tag, which says whether the result is fresh.
    if room - len(origin) >= _MIN_DETAIL // 2:
        return [_one_line(message, room - len(origin)) + origin]
    return [_one_line(message + origin, room)]


def _probe_origin(rec: dict[str, Any]) -> str:
    probes = rec.get("probes") or []
    parts = []
    for p in probes:
        what = "ran in a subprocess" if p.get("kind") == "isolated" else "probed now"
        # A worker that reuses another worker's result keeps that result's age and duration:
        # a cached result stays "from cache", and a result no one probed (a package that is
        # not installed, no GPU: duration 0) gets no tag at all.
        if p.get("origin") in ("cache", "shared") and p.get("age_s") is not None:
            parts.append(f"{p['name']} from cache, {_age(p['age_s'])} old")
        elif p.get("origin") == "run" and p.get("duration"):
            parts.append(f"{p['name']} {what}, {p['duration']:.1f} s")
        elif p.get("origin") == "shared" and p.get("duration"):
            parts.append(f"{p['name']} probed by another xdist worker, {p['duration']:.1f} s")
    return f" [{'; '.join(parts)}]" if parts else ""


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def build_json(
    records: list[dict[str, Any]], exitstatus: int, inv: Distributions, nvml: NvmlSnapshot
) -> dict[str, Any]:
    """The JSON report (schema documented in README.md)."""
    from pytest_unsloth import __version__

    # All four counts always, so a consumer can read summary["failed"] without a default.
    counts: dict[str, int] = dict.fromkeys(("passed", "failed", "skipped", "error"), 0)
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "schema": SCHEMA,
        "plugin_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exitstatus": exitstatus,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {
            d.name: {"version": d.version, "location": d.location} for d in inv.installed()
        },
        "nvml": {
            "available": nvml.available,
            "error": nvml.error,
            "driver_version": nvml.driver_version,
            "cuda_driver_version": nvml.cuda_driver_version_str,
            "cuda_visible_devices": nvml.cuda_visible_devices,
            "gpus": [
                {
                    "nvml_index": g.nvml_index,
                    "cuda_index": g.cuda_index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "capability": list(g.capability),
                    "total_bytes": g.total_bytes,
                    "free_bytes": g.free_bytes,
                    "mig": g.is_mig,
                    "bf16": g.bf16,
                }
                for g in nvml.devices
            ],
        },
        "summary": counts,
        "checks": records,
        "compatibility": _compatibility(inv),
    }


def _compatibility(inv: Distributions) -> dict[str, Any]:
    """Per package: version, who requires it with which range, verdict (issue 14)."""
    from pytest_unsloth.compat.constraints import package_report

    try:
        return package_report(inv)
    except Exception as exc:  # the report must be written whatever the environment holds
        return {"error": f"{type(exc).__name__}: {exc}"}


def markdown_summary(records: list[dict[str, Any]]) -> str:
    """A Markdown table for ``$GITHUB_STEP_SUMMARY``."""
    icon = {"passed": "✅", "failed": "❌", "error": "💥", "skipped": "⏭️"}
    lines = [
        "## pytest-unsloth environment checks",
        "",
        "| check | status | detail |",
        "|---|---|---|",
    ]
    for r in records:
        detail = _one_line(r.get("message", ""), 200).replace("|", "\\|")
        if r.get("fix"):
            detail += "<br>**fix:** " + _one_line(r["fix"], 200).replace("|", "\\|")
        lines.append(f"| `{r['name']}` | {icon.get(r['status'], '')} {r['status']} | {detail} |")
    return "\n".join(lines) + "\n\n"
