"""xdist GPU pinning: ``--unsloth-gpus-per-worker=K`` gives each xdist worker its own K GPUs.

Registered as a plugin by ``plugin.py`` at configure time. On the controller, ``XdistPinning``
(registered only when xdist is present) plans which GPUs each worker gets and puts
``CUDA_VISIBLE_DEVICES`` in the worker's environment before it starts; the worker reads its
pinning back from ``workerinput`` in ``pytest_configure``. The environment checks describe the
whole machine, not the pinned worker: ``machine_environ`` gives them the environment as the user
started pytest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_unsloth.gpu import NvmlSnapshot

# On a pinned xdist worker, a note for skip reasons: "xdist worker gw1 pinned to ...".
PIN_KEY = pytest.StashKey[str]()
WORKERINPUT_PIN = "unsloth_cuda_visible_devices"
# The controller's own CUDA_VISIBLE_DEVICES ([value] or [] when unset), for the machine view.
WORKERINPUT_MACHINE = "unsloth_machine_cuda_visible_devices"
# On a worker the plugin pinned: the CUDA_VISIBLE_DEVICES the user gave pytest (None: unset).
MACHINE_CVD_KEY = pytest.StashKey["str | None"]()


def pytest_configure(config: pytest.Config) -> None:
    """Pin this xdist worker's GPUs; add the xdist hooks (or warn that nothing can be pinned)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and WORKERINPUT_PIN in workerinput:
        # Normally already set by the gateway (spec env) before pytest started in the worker;
        # set it again here for gateways that ignore it. CUDA reads it at initialisation only.
        value, note = workerinput[WORKERINPUT_PIN]
        os.environ["CUDA_VISIBLE_DEVICES"] = value
        config.stash[PIN_KEY] = note
        machine = workerinput.get(WORKERINPUT_MACHINE, [])
        config.stash[MACHINE_CVD_KEY] = str(machine[0]) if machine else None
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistPinning(config), "unsloth-xdist")
    elif workerinput is None:
        _warn_pinning_without_xdist(config)


def _config_warning(config: pytest.Config, warning: pytest.PytestConfigWarning) -> None:
    """A config-time warning; under ``-W error`` a clean usage error instead of an INTERNALERROR."""
    try:
        config.issue_config_time_warning(warning, stacklevel=3)
    except pytest.PytestConfigWarning as exc:
        raise pytest.UsageError(f"pytest-unsloth: {exc}") from None


def machine_environ(config: pytest.Config) -> dict[str, str] | None:
    """The environment as the user gave it to pytest, where the plugin pinned this worker's GPUs.

    Pinning narrows ``CUDA_VISIBLE_DEVICES`` for the user's tests; the environment checks describe
    the machine, so they read this instead. None where nothing was pinned (use ``os.environ``).
    """
    if MACHINE_CVD_KEY not in config.stash:
        return None
    env = dict(os.environ)
    machine = config.stash[MACHINE_CVD_KEY]
    if machine is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = machine
    return env


def _warn_pinning_without_xdist(
    config: pytest.Config, why: str = "without pytest-xdist (-p no:xdist or not installed)"
) -> None:
    from pytest_unsloth.settings import get_settings

    settings = get_settings(config)
    if settings.gpus_per_worker is not None:
        _config_warning(
            config,
            pytest.PytestConfigWarning(
                f"{settings.source('gpus_per_worker')}={settings.gpus_per_worker} has no effect "
                f"{why}: nothing is pinned"
            ),
        )


def plan_pinning(snap: NvmlSnapshot, workers: int, per_worker: int) -> tuple[list[str], str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``workers`` workers, and a warning when short.

    Devices are named by ordinal when the controller sees CUDA's default enumeration, else by
    UUID (so a controller's own CUDA_VISIBLE_DEVICES is honoured). Workers beyond the visible
    GPUs get ``""`` (no GPU): sharing a GPU between workers is what pinning is meant to avoid.
    """
    visible = snap.visible
    by_ordinal = snap.cuda_visible_devices is None
    values: list[str] = []
    for w in range(workers):
        chunk = visible[w * per_worker : (w + 1) * per_worker]
        if len(chunk) < per_worker:
            chunk = ()
        values.append(",".join(str(d.cuda_index) if by_ordinal else d.uuid for d in chunk))
    warning = None
    needed = workers * per_worker
    if not snap.available:
        warning = (
            f"--unsloth-gpus-per-worker={per_worker}: cannot pin xdist workers, NVML is "
            f"unavailable ({snap.error}); every worker gets no GPU"
        )
    elif len(visible) < needed:
        starved = sum(1 for v in values if not v)
        warning = (
            f"--unsloth-gpus-per-worker={per_worker} with {workers} workers needs {needed} "
            f"GPUs, {len(visible)} visible: {starved} worker(s) get none and their GPU tests "
            f"skip. Fix: use -n {max(1, len(visible) // per_worker)}."
        )
    return values, warning


class XdistPinning:
    """xdist hooks (registered only when xdist is present): pin each worker to its own GPUs."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.plan: dict[int, str] = {}
        self.machine_cvd: list[str] = []

    def _per_worker(self) -> int | None:
        from pytest_unsloth.settings import get_settings

        return get_settings(self.config).gpus_per_worker

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        """Warn when pinning is asked for but this run has no workers to pin."""
        if getattr(config, "workerinput", None) is None and not config.getoption(
            "numprocesses", None
        ):
            _warn_pinning_without_xdist(config, "without xdist workers (-n N)")

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, config: pytest.Config, specs: Sequence[Any]) -> None:
        """Plan the pinning and put it in each worker's environment before the worker starts."""
        per_worker = self._per_worker()
        if per_worker is None:
            return
        from pytest_unsloth.gpu import read_snapshot

        machine = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.machine_cvd = [] if machine is None else [machine]
        values, warning = plan_pinning(read_snapshot(), len(specs), per_worker)
        if warning:
            _config_warning(config, pytest.PytestConfigWarning(warning))
        for index, (spec, value) in enumerate(zip(specs, values, strict=True)):
            self.plan[index] = value
            env = getattr(spec, "env", None)
            if isinstance(env, dict):
                # execnet sets these in the worker before it imports anything: earliest possible.
                env["CUDA_VISIBLE_DEVICES"] = value

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Tell the worker its pinning (read back in its pytest_configure)."""
        per_worker = self._per_worker()
        if per_worker is None:
            return
        workerid = str(node.workerinput.get("workerid", ""))
        try:
            index = int(workerid.removeprefix("gw"))
        except ValueError:
            return
        value = self.plan.get(index)
        if value is None:
            return
        note = (
            f"xdist worker {workerid} pinned to CUDA_VISIBLE_DEVICES={value!r} by "
            f"--unsloth-gpus-per-worker={per_worker}"
        )
        node.workerinput[WORKERINPUT_PIN] = (value, note)
        node.workerinput[WORKERINPUT_MACHINE] = list(self.machine_cvd)
