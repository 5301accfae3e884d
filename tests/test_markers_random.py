"""Hypothesis-generated requires_* marker arguments never crash validation or a session."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from pytest_unsloth import markers

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

L4 = {"name": "NVIDIA L4", "total_gib": 22.5, "free_gib": 14.7, "capability": [8, 9]}
T4 = {"name": "Tesla T4", "total_gib": 15.0, "free_gib": 14.5, "capability": [7, 5]}


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["16GB", "16 GiB", "16000MiB", "1.5tb", "cuda:1", "8.0", "triton", "vllm"]),
    lambda children: st.lists(children, max_size=3) | st.tuples(children, children),
    max_leaves=4,
)
_kwargs = st.dictionaries(
    st.sampled_from(["free", "device", "total_across", "capability", "count", "names", "x"]),
    _values,
    max_size=3,
)
_marks = st.builds(
    lambda name, args, kwargs: getattr(pytest.mark, name).with_args(*args, **kwargs).mark,
    st.sampled_from(sorted(markers.MARKER_NAMES)),
    st.lists(_values, max_size=3),
    _kwargs,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mark=_marks)
def test_validate_random_arguments(mark: pytest.Mark) -> None:
    try:
        req = markers.validate(mark)
    except markers.MarkerUsageError as exc:
        message = str(exc)
        req = None
    if req is None:
        assert message  # every refusal says why
        return
    if isinstance(req, markers.VramRequirement):
        assert req.amount_bytes >= 0
        assert isinstance(req.free, bool)
    elif isinstance(req, markers.GpuRequirement):
        assert req.count >= 1


def test_random_markers_in_a_real_session(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    """A few hundred generated markers in one session: no INTERNALERROR, every test reported."""
    fake_nvml(gpus=[L4, T4])
    examples: list[pytest.Mark] = []

    @settings(max_examples=250, deadline=None, database=None)
    @given(mark=_marks)
    def collect(mark: pytest.Mark) -> None:
        examples.append(mark)

    collect()
    lines = ["import pytest", "nan = float('nan')", "inf = float('inf')", ""]
    for i, mark in enumerate(examples):
        args = [_literal(a) for a in mark.args] + [
            f"{k}={_literal(v)}" for k, v in mark.kwargs.items()
        ]
        lines.append(f"@pytest.mark.{mark.name}({', '.join(args)})")
        lines.append(f"def test_{i}(): pass\n")
    pytester.makepyfile(test_random="\n".join(lines))
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    counts = result.parseoutcomes()
    reported = sum(counts.get(k, 0) for k in ("passed", "skipped", "errors", "error", "failed"))
    assert reported == len(examples)
    assert counts.get("failed", 0) == 0  # misuse is a setup error, never a test failure
    assert result.ret in (0, 1)


def _literal(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_literal(v) for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    return repr(value)
