"""Silence the library warnings the plugin's own calls cause, and nothing else.

The model fixtures import bitsandbytes and torch and call peft for the user; the deprecation
warnings and log lines those calls raise inside the libraries are about the libraries, not about
the user's code, yet they land in the user's test output (and fail a run with
``-W error::DeprecationWarning``). Each entry below names one such message; the filters are
active only while a fixture's own code runs, so the same warning from the user's code still shows.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# (category, message regex): raised by the libraries during the plugin's calls.
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch.utils.mkldnn decorates with torch.jit.script_method; bitsandbytes imports it.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    # torch's pytree, on its first import.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # peft reads model.is_gradient_checkpointing, which transformers 5.23 renamed.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_(enable|disable)` is deprecated"),
    # GRPOConfig's own default sets TrainingArguments' old field name (TRL 1.16).
    (FutureWarning, r"`gradient_checkpointing` is deprecated"),
)

# (logger, message regex): bitsandbytes logs the missing optional `kernels` package at import.
LOG_LINES: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", r"from kernels-community"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def library_noise_silenced() -> Iterator[None]:
    """While the plugin's own code runs: drop the known library warnings and log lines."""
    added: list[tuple[logging.Logger, logging.Filter]] = []
    with warnings.catch_warnings():
        for category, message in WARNINGS:
            warnings.filterwarnings("ignore", message, category)
        for name, pattern in LOG_LINES:
            logger = logging.getLogger(name)
            log_filter: logging.Filter = _DropMatching(pattern)
            logger.addFilter(log_filter)
            added.append((logger, log_filter))
        try:
            yield
        finally:
            for logger, log_filter in added:
                logger.removeFilter(log_filter)
