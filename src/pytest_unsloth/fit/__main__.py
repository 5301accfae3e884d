"""``python -m pytest_unsloth.fit CONFIG_JSON_OR_FOLDER [--setting value ...] [--json]``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from pytest_unsloth.fit.estimate import ALIASES, DEFAULTS, estimate_memory
from pytest_unsloth.fit.plan import describe_fits, find_config, gib, what_fits
from pytest_unsloth.settings import parse_amount_bytes
from pytest_unsloth.util.units import GIB


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare words: unsloth, grpo, adamw_8bit, ...


def _amount(text: str) -> int:
    try:
        return parse_amount_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one --NAME per setting (ini / GRPOConfig / from_pretrained names)."""
    ap = argparse.ArgumentParser(
        prog="python -m pytest_unsloth.fit",
        description="Estimate the peak GPU memory of one LoRA/QLoRA SFT or GRPO step from a "
        "model's config.json (no weights, no GPU, no download).",
    )
    ap.add_argument("model", help="config.json, a model folder, or a Hub id in the local cache")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    ap.add_argument(
        "--budget",
        type=_amount,
        default=None,
        help="memory to fit in (24GiB): also print the largest settings that fit",
    )
    for name, default in DEFAULTS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        ap.add_argument(
            *flags,
            dest=name,
            type=_value,
            default=None,
            metavar="VALUE",
            help=f"default: {default}",
        )
    for alias, name in ALIASES.items():
        ap.add_argument(f"--{alias}", dest=name, type=_value, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Print the breakdown; exit 2 on bad input, 1 when --budget is given and exceeded."""
    ap = build_parser()
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    try:
        config = find_config(args.model)
        est = estimate_memory(config, **settings)
        fits = what_fits(config, settings, args.budget) if args.budget is not None else None
    except (OSError, ValueError, KeyError) as exc:
        ap.error(str(exc))
    if args.json:
        out = est.as_dict()
        if args.budget is not None:
            out["budget_bytes"] = args.budget
            out["fits"] = est.total_bytes <= args.budget
            out["largest_fitting"] = fits
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
    else:
        s = est.settings
        print(
            f"{config}: {est.model_type}, {est.params / 1e9:.2f} B parameters, "
            f"{est.trainable_params / 1e6:.1f} M trainable"
        )
        print(
            f"task={s['task']} stack={s['stack']} load_in_4bit={s['load_in_4bit']} "
            f"gradient_checkpointing={s['use_gradient_checkpointing']} optim={s['optim']}"
        )
        width = max(len(k) for k in est.parts)
        for name, value in est.parts.items():
            if value:
                print(f"  {name:<{width}}  {value / GIB:8.2f} GiB")
        print(f"  {'total':<{width}}  {est.total_bytes / GIB:8.2f} GiB")
        for note in est.notes:
            print(f"note: {note}")
        if fits is not None:
            if est.total_bytes <= args.budget:
                print(f"fits in {gib(args.budget)}")
            else:
                print(
                    f"does not fit in {gib(args.budget)}; settings that fit: "
                    f"{describe_fits(fits, est)}"
                )
    return 1 if args.budget is not None and est.total_bytes > args.budget else 0


if __name__ == "__main__":
    raise SystemExit(main())
