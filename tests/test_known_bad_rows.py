"""One fake-install scenario per known_bad.json row: each row fires, says what it found, cites
its upstream URL, and its fix never moves torch.

Each scenario writes ``NAME-VERSION.dist-info`` folders (with the Requires-Dist the real wheels
declare) first on sys.path; everything else is the real environment of the test run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distfake import write_dist
from pytest_unsloth.checks.env import RULES, load_known_bad
from test_env_scenarios import run_env

Dists = list[tuple[str, str, list[str]]]

# row id -> (installs, text the failure must contain)
SCENARIOS: dict[str, tuple[Dists, str]] = {
    "transformers5-bitsandbytes-below-0.46.1": (
        [("transformers", "5.17.0", []), ("bitsandbytes", "0.45.5", [])],
        "transformers 5.17.0 with bitsandbytes 0.45.5",
    ),
    "unsloth-bitsandbytes-0.46.0": (
        [("unsloth", "2026.10.9", []), ("bitsandbytes", "0.46.0", [])],
        "unsloth 2026.10.9 with bitsandbytes 0.46.0",
    ),
    "unsloth-bitsandbytes-0.48.0": (
        [("unsloth", "2026.10.9", []), ("bitsandbytes", "0.48.0", [])],
        "unsloth 2026.10.9 with bitsandbytes 0.48.0",
    ),
    "trl-without-grpo": ([("trl", "0.13.0", [])], "trl 0.13.0 has no GRPOTrainer"),
    "unsloth-2025.10.9-trl-below-0.18.2": (
        [("torch", "2.11.0", []), ("unsloth", "2026.10.9", []), ("trl", "0.17.0", [])],
        "unsloth 2026.10.9 with trl 0.17.0",
    ),
    "torchvision-torch-mismatch": (
        [("torch", "2.13.0+cpu", []), ("torchvision", "0.24.1", ["torch==2.9.1"])],
        "torchvision 0.24.1 was built for torch==2.9.1, torch 2.13.0+cpu is installed",
    ),
    "torchvision-torch-pairing": (
        [("torch", "2.2.1+cpu", []), ("torchvision", "0.16.0", [])],
        "torch 2.2 pairs with torchvision 0.17",
    ),
    "torchaudio-built-for-another-torch": (
        [("torch", "2.11.0+cu130", []), ("torchaudio", "2.8.0", ["torch==2.8.0"])],
        "torchaudio 2.8.0 was built for torch==2.8.0, torch 2.11.0+cu130 is installed",
    ),
    "xformers-built-for-another-torch": (
        [("torch", "2.11.0+cu130", []), ("xformers", "0.0.28.post1", ["numpy", "torch==2.4.1"])],
        "xformers 0.0.28.post1 was built for torch==2.4.1, torch 2.11.0+cu130 is installed",
    ),
    "vllm-built-for-another-torch": (
        [("torch", "2.11.0+cu130", []), ("vllm", "0.11.0", ["torch==2.8.0"])],
        "vllm 0.11.0 was built for torch==2.8.0, torch 2.11.0+cu130 is installed",
    ),
    "vllm-torchvision-pin": (
        [
            ("torch", "2.8.0", []),
            ("torchvision", "0.24.0", []),
            ("vllm", "0.11.0", ["torch==2.8.0", "torchvision==0.23.0"]),
        ],
        "vllm 0.11.0 was built for torchvision==0.23.0, torchvision 0.24.0 is installed",
    ),
    "vllm-torchaudio-pin": (
        [
            ("torch", "2.8.0", []),
            ("torchaudio", "2.9.0", []),
            ("vllm", "0.11.0", ["torch==2.8.0", "torchaudio==2.8.0"]),
        ],
        "vllm 0.11.0 was built for torchaudio==2.8.0, torchaudio 2.9.0 is installed",
    ),
    "torch-triton-pin": (
        [("torch", "2.11.0", ["triton==3.6.0"]), ("triton", "3.5.1", [])],
        "torch 2.11.0 was built for triton==3.6.0, triton 3.5.1 is installed",
    ),
    "flash-attn-wheel-for-another-torch": (
        [("torch", "2.11.0+cu130", []), ("flash-attn", "2.8.3+cu12torch2.6cxx11abiFALSE", [])],
        "flash-attn 2.8.3+cu12torch2.6cxx11abiFALSE is a wheel built for torch 2.6",
    ),
    "numpy2-with-torch-below-2.3": (
        [("torch", "2.2.2", []), ("numpy", "2.0.0", [])],
        "torch 2.2.2 with numpy 2.0.0",
    ),
    "numpy-2.1.0-with-torch-2.4.0": (
        [("torch", "2.4.0", []), ("numpy", "2.1.0", [])],
        "torch 2.4.0 with numpy 2.1.0",
    ),
    "peft-0.18-needs-transformers-4.52": (
        [("peft", "0.18.0", ["torch>=1.13.0", "transformers"]), ("transformers", "4.51.3", [])],
        "peft 0.18.0 with transformers 4.51.3",
    ),
    "unsloth-xformers-too-new-for-torch-2.2": (
        [("unsloth", "2024.1", []), ("torch", "2.1.2", []), ("xformers", "0.0.24", [])],
        "unsloth 2024.1 with torch 2.1.2 and xformers 0.0.24",
    ),
    "unsloth-xformers-too-new-for-torch-2.3": (
        [("unsloth", "2024.5", []), ("torch", "2.2.2", []), ("xformers", "0.0.26", [])],
        "unsloth 2024.5 with torch 2.2.2 and xformers 0.0.26",
    ),
    "unsloth-xformers-too-new-for-torch-2.4": (
        [("unsloth", "2024.8", []), ("torch", "2.3.1", []), ("xformers", "0.0.28", [])],
        "unsloth 2024.8 with torch 2.3.1 and xformers 0.0.28",
    ),
}


def test_table_has_at_least_20_rows_each_with_a_url_and_a_scenario() -> None:
    """Every row carries its evidence, and every row is exercised below (no untested row)."""
    rows = load_known_bad()
    assert len(rows) >= 20
    assert {r["id"] for r in rows} == set(SCENARIOS)
    for row in rows:
        assert row["why"] and row["source"], row["id"]
        if "rule" in row:
            assert row["rule"] in RULES and row.get("applies"), row["id"]
        else:
            assert row["when"] and row["fix"], row["id"]
    new = [r for r in rows if r["id"] not in _ORIGINAL_ROWS]
    assert all(r.get("url", "").startswith("https://github.com/") for r in new)


_ORIGINAL_ROWS = {
    "unsloth-bitsandbytes-0.46.0",
    "unsloth-bitsandbytes-0.48.0",
}


@pytest.mark.parametrize("row_id", sorted(SCENARIOS))
def test_row_fires_on_its_scenario(pytester: pytest.Pytester, site: Path, row_id: str) -> None:
    """The row's scenario fails known-bad with the row's finding; torch is never the fix."""
    installs, expected = SCENARIOS[row_id]
    for name, version, requires in installs:
        write_dist(site, name, version, requires)
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}, run.output
    msg = run.text["known-bad"]
    assert expected in msg
    row = next(r for r in load_known_bad() if r["id"] == row_id)
    assert row["source"] in msg
    fix = msg.split("fix:", 1)[1]
    torch = next((v for n, v, _ in installs if n == "torch"), None)
    if torch is not None:
        assert not re.search(r"pip install 'torch[=<>!~']", fix), fix
        assert "'torch==" not in fix or f"'torch=={torch.split('+')[0]}'" in fix


def test_rows_stay_quiet_on_a_matching_stack(pytester: pytest.Pytester, site: Path) -> None:
    """Matching builds trigger nothing: the rules compare, they do not merely detect packages."""
    write_dist(site, "torch", "2.8.0", ["triton==3.4.0"])
    write_dist(site, "triton", "3.4.0")
    write_dist(site, "torchvision", "0.23.0", ["torch==2.8.0"])
    write_dist(site, "torchaudio", "2.8.0", ["torch==2.8.0"])
    write_dist(site, "xformers", "0.0.32.post1", ["torch==2.8.0"])
    write_dist(site, "flash-attn", "2.8.3+cu12torch2.8cxx11abiTRUE")
    write_dist(site, "vllm", "0.11.0", ["torch==2.8.0", "torchvision==0.23.0", "torchaudio==2.8.0"])
    write_dist(site, "numpy", "2.1.1")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.outcomes == {"known-bad": "passed"}, run.text


# Combinations no row may match (each comment says why they are fine).
QUIET: dict[str, Dists] = {
    # unsloth 2026.10.9 declares trl>=0.18.2,!=0.19.0,<=1.15.0: 0.19.1 is inside it.
    "unsloth-2026.10.9-trl-0.19.1": [("unsloth", "2026.10.9", []), ("trl", "0.19.1", [])],
    # The floor arrived in 2025.10.9; 2025.10.8 still declared trl>=0.7.9 (minus exclusions).
    "unsloth-2025.10.8-trl-0.17.0": [("unsloth", "2025.10.8", []), ("trl", "0.17.0", [])],
}


@pytest.mark.parametrize("case", sorted(QUIET))
def test_row_stays_quiet_where_upstream_allows_it(
    pytester: pytest.Pytester, site: Path, case: str
) -> None:
    """Versions inside what the upstream release itself declares trigger no row."""
    for name, version, requires in QUIET[case]:
        write_dist(site, name, version, requires)
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.outcomes == {"known-bad": "passed"}, run.text


def test_unsloth_trl_floor_fix_names_the_installed_unsloth(
    pytester: pytest.Pytester, site: Path
) -> None:
    """The fix keeps pip inside unsloth's own windows and keeps torch where it is."""
    for name, version, requires in SCENARIOS["unsloth-2025.10.9-trl-below-0.18.2"][0]:
        write_dist(site, name, version, requires)
    run = run_env(pytester, "--unsloth-checks=known-bad")
    fix = run.text["known-bad"].split("fix:", 1)[1]
    assert "pip install 'trl>=0.18.2,!=0.19.0' 'unsloth==2026.10.9' 'torch==2.11.0'" in fix
