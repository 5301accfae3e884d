"""Fit the estimator's transient coefficients to tests/data/fit_grid.jsonl and print the errors.

python benchmarks/fit_calibrate.py            # errors of the coefficients as they are
python benchmarks/fit_calibrate.py --fit      # refit, print the coefficients and errors
python benchmarks/fit_calibrate.py --loo      # leave-one-out: refit without each point
python benchmarks/fit_calibrate.py --held-out # points measured after the fit (never fitted)
python benchmarks/fit_calibrate.py --table [--held-out]   # README table rows
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
from typing import Any

from pytest_unsloth.fit.estimate import (
    COEFFICIENTS,
    Coefficients,
    accelerate_style,
    estimate_memory,
)

DATA = pathlib.Path(__file__).parent.parent / "tests" / "data" / "fit_grid.jsonl"
# Measured after the coefficients were fitted (estimates written down before the run): never
# used by --fit, reported on their own.
HELD_OUT = DATA.with_name("fit_heldout.jsonl")


def settings_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The estimate_memory settings a grid record was measured with."""
    s: dict[str, Any] = {
        "task": rec["task"],
        "stack": "unsloth" if rec["stack"] == "unsloth" else "transformers",
        "load_in_4bit": rec["load_in_4bit"],
        "lora_r": rec["lora_r"],
        "optim": rec["optim"],
        "use_gradient_checkpointing": rec["gradient_checkpointing"],
        "per_device_train_batch_size": rec["batch_size"],
    }
    if rec["task"] == "grpo":
        s.update(
            num_generations=rec["num_generations"],
            max_completion_length=rec["max_completion_length"],
            max_prompt_length=rec["prompt_len"],
            beta=rec["beta"],
        )
    else:
        s["max_seq_length"] = rec["seq_len"]
    return s


def records(path: pathlib.Path = DATA) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["ok"]]


def markdown_rows(recs: list[dict[str, Any]], c: Coefficients) -> list[str]:
    """README table rows: the setting, the measured peak, the estimate and both errors."""
    rows = []
    for r in recs:
        est = estimate_memory(r["config"], c, **settings_of(r)).total_bytes
        acc = accelerate_style(r["config"], **settings_of(r)) / r["peak_total"] - 1
        task = r["task"]
        if task == "grpo":
            task += f" G={r['num_generations']} C={r['max_completion_length']}"
            task += f" beta={r['beta']}" if r["beta"] else ""
        stack = "unsloth" if r["stack"] == "unsloth" else "transformers+peft"
        rows.append(
            f"| {r['index']} | {r['model']} | {task} | {stack} | "
            f"{'4-bit' if r['load_in_4bit'] else 'bf16'} | {r['gradient_checkpointing']} | "
            f"{r['batch_size']} x {r['seq_len']} | {r['peak_total'] / 2**30:.2f} GiB | "
            f"{est / 2**30:.2f} GiB | {est / r['peak_total'] - 1:+.1%} | {acc:+.0%} |"
        )
    return rows


def errors(c: Coefficients, recs: list[dict[str, Any]]) -> list[float]:
    return [
        estimate_memory(r["config"], c, **settings_of(r)).total_bytes / r["peak_total"] - 1
        for r in recs
    ]


FREE = [
    "act_hidden",
    "act_inter",
    "act_q",
    "ckpt_live_layers",
    "unsloth_live_layers",
    "unsloth_act_scale",
    "logits_sft",
    "logits_grpo",
    "unsloth_logits_sft",
    "unsloth_logits_grpo",
    "allocator",
    "ckpt_kept",
    "logits_ref",
    "logits_row",
]
# Physical bounds. RMSNorm keeps an fp32 copy of its input (>= 8 bytes x hidden per layer);
# checkpointing keeps at least the layer input and half a layer is live in backward; bf16 logits
# are 2 bytes and their loss adds more; with expandable segments the allocator holds at most a
# few percent beyond the live tensors. (act_eager_scores and logits_softcap are set from the
# buffers, not fitted: a fit moved them to stand in for each other on gemma-2 points.)
BOUNDS = {
    "act_hidden": (8, 40),
    "act_inter": (4, 40),
    "act_q": (2, 40),
    "ckpt_kept": (1, 4),
    "ckpt_live_layers": (0.5, 4),
    "unsloth_live_layers": (0.5, 6),
    "logits_sft": (6, 30),
    "logits_grpo": (4, 30),
    "allocator": (0, 0.1),
    "logits_ref": (2, 12),
    "logits_row": (2, 8),
}


def fit() -> Coefficients:
    import numpy as np
    from scipy.optimize import least_squares

    recs = records()

    def resid(x: Any) -> Any:
        c = dataclasses.replace(COEFFICIENTS, **dict(zip(FREE, map(float, x), strict=False)))
        e = np.array(errors(c, recs))
        return np.concatenate([e, 3 * np.maximum(np.abs(e) - 0.07, 0)])

    lower = np.array([BOUNDS.get(k, (0, np.inf))[0] for k in FREE], dtype=float)
    upper = np.array([BOUNDS.get(k, (0, np.inf))[1] for k in FREE], dtype=float)
    x0 = np.array([getattr(COEFFICIENTS, k) for k in FREE], dtype=float)
    x0 = np.clip(x0, lower + 1e-3, upper - 1e-3)
    sol = least_squares(resid, x0, bounds=(lower, upper))
    return dataclasses.replace(COEFFICIENTS, **dict(zip(FREE, map(float, sol.x), strict=False)))


def leave_one_out() -> None:
    """Refit without each point and predict it: the error on a setting the fit never saw."""
    global records
    every = records()
    held = []
    for i, r in enumerate(every):
        rest = every[:i] + every[i + 1 :]
        records = lambda rest=rest: rest  # noqa: E731
        c = fit()
        held.append(errors(c, [r])[0])
        print(f"#{r['index']:2d} held-out error {held[-1]:+.1%}", flush=True)
    a = [abs(e) for e in held]
    print(f"leave-one-out: median {statistics.median(a):.1%} worst {max(a):.1%}")


def main() -> None:
    if "--loo" in sys.argv:
        leave_one_out()
        return
    if "--table" in sys.argv:
        path = HELD_OUT if "--held-out" in sys.argv else DATA
        print("\n".join(markdown_rows(records(path), COEFFICIENTS)))
        return
    recs = records(HELD_OUT if "--held-out" in sys.argv else DATA)
    c = fit() if "--fit" in sys.argv else COEFFICIENTS
    if "--fit" in sys.argv:
        print({k: round(getattr(c, k), 3) for k in FREE})
    err = errors(c, recs)
    for r, e in zip(recs, err, strict=False):
        acc = accelerate_style(r["config"], **settings_of(r)) / r["peak_total"] - 1
        print(
            f"#{r['index']:2d} {r['model']:13s} {r['task']:4s} {r['stack']:7s} "
            f"4bit={int(r['load_in_4bit'])} gc={r['gradient_checkpointing']:7s} "
            f"meas {r['peak_total'] / 2**30:6.2f} GiB  err {e:+.1%}  accel {acc:+.1%}"
        )
    abs_err = [abs(e) for e in err]
    print(f"median {statistics.median(abs_err):.1%} worst {max(abs_err):.1%}")


if __name__ == "__main__":
    main()
