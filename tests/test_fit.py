"""Will it fit? The memory estimator against measured H200 peaks, its check, marker and CLI."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuspecs import fake_gpu
from pytest_unsloth.checks.fit import CLOSE_CALL
from pytest_unsloth.fit import accelerate_style, estimate_memory
from pytest_unsloth.fit import vllm as vllm_sizing
from pytest_unsloth.fit.arch import arch_from_config
from pytest_unsloth.fit.plan import largest_fitting, what_fits
from pytest_unsloth.util.units import GIB
from subrun import fit_cli

ROOT = Path(__file__).parent.parent
GRID = ROOT / "tests" / "data" / "fit_grid.jsonl"
BAND = 0.10

sys.path.insert(0, str(ROOT / "benchmarks"))
from fit_calibrate import settings_of  # noqa: E402

RECORDS = [json.loads(line) for line in GRID.read_text().splitlines()]
MEASURED = [r for r in RECORDS if r["ok"]]
CONFIGS = {r["model"]: r["config"] for r in RECORDS}

H100 = fake_gpu("H100", uuid="GPU-10010010-0000-1111-2222-333333333333", free_gib=79.0)
L4 = fake_gpu("L4", uuid="GPU-4c4c4c4c-0000-1111-2222-333333333333", free_gib=14.7)


def _err(rec: dict[str, Any]) -> float:
    est = estimate_memory(rec["config"], **settings_of(rec))
    return float(est.total_bytes / rec["peak_total"] - 1)


# ---------------------------------------------------------------------------------------------
# The measured grid


def test_grid_covers_what_the_issue_asks():
    assert len(MEASURED) >= 24
    families = {r["config"]["model_type"] for r in MEASURED}
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"} <= families
    assert {r["stack"] for r in MEASURED} == {"hf", "unsloth"}
    assert {r["task"] for r in MEASURED} == {"sft", "grpo"}
    assert {r["load_in_4bit"] for r in MEASURED} == {True, False}
    assert {r["gradient_checkpointing"] for r in MEASURED} == {"off", "true", "unsloth"}
    gens = [r["num_generations"] for r in MEASURED if r["task"] == "grpo"]
    assert min(gens) <= 4 and max(gens) == 16
    for rec in MEASURED:
        assert rec["versions"]["torch"] and rec["device"] == "cuda"
        assert rec["peak_total"] > rec["peak_reserved"] >= rec["peak_allocated"] > 0


@pytest.mark.parametrize("rec", MEASURED, ids=[f"{r['index']}-{r['model']}" for r in MEASURED])
def test_estimate_within_band_of_measured_peak(rec: dict[str, Any]):
    err = _err(rec)
    assert abs(err) <= BAND, f"estimate off by {err:+.1%} on grid point {rec['index']}"


HELD_OUT = [
    json.loads(line) for line in (GRID.with_name("fit_heldout.jsonl")).read_text().splitlines()
]
PREDICTIONS = ROOT / "docs/gpu-runs/2026-11-30/session3/heldout-predictions-before-measuring.txt"


@pytest.mark.parametrize("rec", HELD_OUT, ids=[f"{r['index']}-{r['model']}" for r in HELD_OUT])
def test_held_out_point_within_band(rec: dict[str, Any]):
    err = _err(rec)
    assert abs(err) <= BAND, f"estimate off by {err:+.1%} on held-out point {rec['index']}"


def test_held_out_points_are_new_settings_estimated_before_the_run():
    seen = {json.dumps(settings_of(r) | {"m": r["model"]}, sort_keys=True) for r in MEASURED}
    assert len(HELD_OUT) == 8 and all(r["ok"] and r["index"] >= 40 for r in HELD_OUT)
    for rec in HELD_OUT:
        assert json.dumps(settings_of(rec) | {"m": rec["model"]}, sort_keys=True) not in seen
        assert rec["alloc_conf"] == "expandable_segments:True"
    assert {"hf", "unsloth"} == {r["stack"] for r in HELD_OUT}
    assert any(r["beta"] > 0 and r["load_in_4bit"] for r in HELD_OUT)


def test_held_out_estimates_written_before_the_run_were_within_band():
    # the figures as written down before the run (the coefficients have moved since only by
    # modelling the context's growth with completion length)
    pattern = r"^#(\d+) .*: estimate ([0-9.]+) GiB$"
    written = dict(re.findall(pattern, PREDICTIONS.read_text(), re.M))
    assert sorted(map(int, written)) == [r["index"] for r in HELD_OUT]
    errors = [float(written[str(r["index"])]) * GIB / r["peak_total"] - 1 for r in HELD_OUT]
    assert max(map(abs, errors)) <= BAND
    assert statistics.median(map(abs, errors)) < 0.06


def test_grid_is_measured_under_expandable_segments_as_unsloth_runs():
    # unsloth_zoo sets PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF to expandable_segments:True
    # at import, so every point carries that setting, unsloth's through its own import
    assert all(r["alloc_conf"] == "expandable_segments:True" for r in MEASURED)
    default = {
        r["index"]: r
        for r in map(json.loads, GRID.with_name("fit_default_alloc.jsonl").read_text().splitlines())
    }
    # the default allocator's reserved peak is never meaningfully below the expandable one, and
    # on GRPO it can be far above it (generate's outgrown KV blocks stay cached)
    ratios = {r["index"]: default[r["index"]]["peak_total"] / r["peak_total"] for r in MEASURED}
    assert min(ratios.values()) > 0.92
    assert max(ratios.values()) > 2.0 and max(ratios, key=ratios.__getitem__) == 34


CAPPED = [
    json.loads(line) for line in (GRID.with_name("fit_capped.jsonl")).read_text().splitlines()
]
NEED = {r["index"]: r["peak_reserved"] for r in MEASURED + HELD_OUT}


def _cap_of(rec: dict[str, Any]) -> float:
    """The cap as a multiple of the estimate's torch part (the estimate minus its context)."""
    est = estimate_memory(rec["config"], **settings_of(rec))
    return float(rec["cap_bytes"] / (est.total_bytes - est.parts["cuda_context"]))


@pytest.mark.parametrize(
    "rec",
    [r for r in CAPPED if r["margin"] == 1.0],
    ids=lambda r: f"{r['index']}-at-estimate",
)
def test_capped_at_the_estimate_a_step_completes_when_the_estimate_covers_its_need(
    rec: dict[str, Any],
):
    # default allocator, torch capped at the estimate (context apart): the step completes exactly
    # when the cap reaches the reserved peak measured with expandable segments (1.5 % slack), so
    # that peak is the need, whatever the default allocator's uncapped peak was
    # the caps were the estimates of the day (within 2 % of today's)
    assert rec["alloc_conf"] == "" and abs(_cap_of(rec) - 1.0) < 0.02
    assert rec["ok"] is (rec["cap_bytes"] >= NEED[rec["index"]] * 0.985), rec["index"]
    assert rec["ok"] or rec["oom"]  # a failure under a cap is an OOM, nothing else


@pytest.mark.parametrize(
    "rec",
    [
        pytest.param(
            r,
            marks=[
                pytest.mark.xfail(
                    strict=True,
                    reason="#26's 4-bit reference pass fragments the default allocator past 10 %",
                )
            ]
            if r["index"] == 26
            else [],
            id=f"{r['index']}-at-110pct",
        )
        for r in CAPPED
        if r["margin"] == 1.1
    ],
)
def test_the_close_call_margin_covers_the_default_allocator(rec: dict[str, Any]):
    # the fit check calls anything within 10 % of free memory a close call: with 10 % more than
    # the estimate, the step completes under PyTorch's default allocator (held-out points too)
    # the check calls a fit comfortable when free >= estimate / (1 - CLOSE_CALL): the run had
    # no more room than that above today's estimate
    assert rec["alloc_conf"] == "" and 1.08 < _cap_of(rec) <= 1 / (1 - CLOSE_CALL)
    assert rec["ok"], rec.get("error", "")[-300:]


def test_capped_runs_cover_held_out_points_and_every_under_estimate():
    at_110 = {r["index"] for r in CAPPED if r["margin"] == 1.1}
    assert {r["index"] for r in HELD_OUT if r["task"] == "grpo" and r["stack"] == "hf"} <= at_110
    short = {r["index"] for r in CAPPED if r["margin"] == 1.0 and not r["ok"]}
    assert short and short <= at_110


def test_gemma2_logit_softcap_counts_unless_the_config_turns_it_off():
    cfg = dict(CONFIGS["gemma-2-2b"])
    capped = estimate_memory(cfg, stack="transformers", max_seq_length=1024).parts["logits"]
    cfg["final_logit_softcapping"] = None
    plain = estimate_memory(cfg, stack="transformers", max_seq_length=1024).parts["logits"]
    assert capped > plain > 0


def test_grid_error_summary_beats_accelerate_style():
    errs = [abs(_err(r)) for r in MEASURED]
    acc = [
        abs(accelerate_style(r["config"], **settings_of(r)) / r["peak_total"] - 1) for r in MEASURED
    ]
    assert statistics.median(errs) < 0.03
    assert max(errs) <= BAND
    # weights + an Adam multiple misses activations and logits: far off on every point
    assert statistics.median(acc) > 0.5
    assert all(a > e for a, e in zip(acc, errs, strict=True))


@pytest.mark.parametrize("rec", MEASURED[::3], ids=lambda r: f"{r['index']}-{r['model']}")
def test_weights_match_the_measured_resident_memory(rec: dict[str, Any]):
    est = estimate_memory(rec["config"], **settings_of(rec))
    resident = est.parts["weights"] + est.parts["lora_adapters"]
    measured = rec["phases"]["lora"]["allocated"]
    assert abs(resident / measured - 1) < 0.07


def test_context_part_is_the_measured_nvml_overhead():
    for rec in MEASURED:
        est = estimate_memory(rec["config"], **settings_of(rec))
        assert abs(est.parts["cuda_context"] - rec["context_bytes"]) < 128 * 1024**2


# ---------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-8b", 8_190_735_360),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.1-8b", 8_030_261_248),
        ("mistral-7b", 7_248_023_552),
        ("gemma-2-2b", 2_614_341_888),
        ("gemma-3-1b", 999_885_952),
        ("phi-3-mini", 3_821_079_552),
        ("phi-4-mini", 3_836_021_760),
    ],
)
def test_parameter_count_matches_transformers(model: str, params: int):
    # the counts are what transformers builds on the meta device for the same config
    assert arch_from_config(CONFIGS[model]).total_params == params


@pytest.mark.parametrize(
    ("config_class", "layers"),
    [("MixtralConfig", 2), ("Qwen2MoeConfig", 2), ("Qwen3MoeConfig", 2), ("GraniteConfig", 2)],
)
def test_moe_and_other_families_count_what_transformers_builds(config_class: str, layers: int):
    # the config classes' defaults are real checkpoints' shapes (Mixtral-8x7B, Qwen1.5-MoE-A2.7B
    # with its gated shared expert, a Qwen3-MoE); two layers keep the meta build quick
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_class)(num_hidden_layers=layers)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())
    assert arch_from_config(config.to_dict()).total_params == built


def test_unknown_family_is_counted_on_the_meta_device():
    pytest.importorskip("transformers")
    cfg = {
        "model_type": "gpt_neox",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
    }
    arch = arch_from_config(cfg)
    assert not arch.known and arch.layers == 2 and arch.linear_params > 0
    assert estimate_memory(cfg, stack="transformers").total_bytes > 0


def test_multimodal_wrapper_reads_text_config(tmp_path: Path):
    text = dict(CONFIGS["gemma-3-1b"])
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    )
    assert arch_from_config(tmp_path).total_params == arch_from_config(text).total_params


@pytest.mark.parametrize(
    "vision",
    [
        {},  # SiglipVisionConfig's defaults, with the attention-pooling head
        # gemma-3-4b-it's vision_config (the keys its config.json writes)
        {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
    ],
    ids=["siglip-defaults", "gemma-3-4b-vision"],
)
def test_gemma3_multimodal_counts_its_vision_tower_like_transformers(vision: dict[str, Any]):
    # FastModel / Gemma3ForConditionalGeneration load the vision tower too: ~0.4 B parameters
    # (0.8 GB in 16 bit) that the text config alone would miss
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3Config(
        vision_config=vision or None, text_config={"num_hidden_layers": 2}
    )
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(config)
    built = sum(p.numel() for p in model.parameters())
    written = {"model_type": "gemma3", "text_config": config.text_config.to_dict()}
    written["vision_config"] = {"model_type": "siglip_vision_model", **vision}
    arch = arch_from_config(written)
    assert arch.total_params == built and arch.vision_params > 0
    text_only = estimate_memory(config.text_config.to_dict()).parts["weights"]
    assert estimate_memory(written).parts["weights"] - text_only == 2 * arch.vision_params


def test_moe_experts_and_tied_embeddings():
    dense = {**CONFIGS["qwen2.5-0.5b"], "model_type": "qwen2_moe"}
    moe = {**dense, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512}
    arch = arch_from_config(moe)
    assert arch.experts == 8 and arch.intermediate == 512
    untied = arch_from_config({**CONFIGS["qwen2.5-0.5b"], "tie_word_embeddings": False})
    tied = arch_from_config(CONFIGS["qwen2.5-0.5b"])
    assert untied.total_params - tied.total_params == 151936 * 896


def test_nf4_weights_follow_bitsandbytes_block_layout():
    arch = arch_from_config(CONFIGS["llama-3.1-8b"])
    dq = estimate_memory(CONFIGS["llama-3.1-8b"], stack="transformers").parts["weights"]
    plain = estimate_memory(
        CONFIGS["llama-3.1-8b"], stack="transformers", bnb_4bit_use_double_quant=False
    ).parts["weights"]
    blocks = arch.linear_params / 64
    # fp32 absmax (4 bytes per 64-block) against uint8 + one fp32 per 256 blocks
    assert plain - dq == pytest.approx(blocks * (4 - 1 - 8 / 256), rel=1e-3)
    b16 = estimate_memory(CONFIGS["llama-3.1-8b"], load_in_4bit=False).parts["weights"]
    assert b16 == arch.total_params * 2


def test_optimizer_and_full_finetuning_parts():
    cfg = CONFIGS["llama-3.2-1b"]
    lora32 = estimate_memory(cfg, optim="adamw_torch")
    lora8 = estimate_memory(cfg, optim="paged_adamw_8bit")
    n = lora32.trainable_params
    assert lora32.parts["optimizer"] == 8 * n and lora8.parts["optimizer"] == 2 * n
    assert any("paged" in note for note in lora8.notes)
    full = estimate_memory(cfg, full_finetuning=True, load_in_4bit=False, optim="adamw_torch")
    assert full.trainable_params == full.params
    assert full.parts["gradients"] == 2 * full.params and full.parts["optimizer"] == 4 * full.params


def test_checkpointing_modes_order_activations():
    cfg = CONFIGS["llama-3.1-8b"]
    act = {
        gc: estimate_memory(cfg, stack="transformers", use_gradient_checkpointing=gc).parts[
            "activations"
        ]
        for gc in (False, True)
    }
    uns = estimate_memory(cfg, use_gradient_checkpointing="unsloth").parts["activations"]
    assert act[False] > 5 * act[True] > 0 and uns < act[False]


def test_grpo_generation_kv_and_reference_pass():
    cfg = CONFIGS["qwen2.5-1.5b"]
    est = estimate_memory(
        cfg,
        task="grpo",
        num_generations=8,
        max_completion_length=1024,
        max_prompt_length=128,
        beta=0.04,
        stack="transformers",
    )
    arch = arch_from_config(cfg)
    kv = 8 * (128 + 1024) * arch.layers * 2 * arch.kv_dim * 2
    assert est.phases["generate"] >= kv
    assert "reference" in est.phases and est.phases["train"] > est.phases["reference"] / 10
    more = estimate_memory(
        cfg,
        task="grpo",
        num_generations=16,
        max_completion_length=1024,
        max_prompt_length=128,
        stack="transformers",
    )
    assert more.total_bytes > est.total_bytes


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="unknown setting 'num_generation'"):
        estimate_memory(CONFIGS["llama-3.2-1b"], num_generation=4)
    with pytest.raises(ValueError, match="use_gradient_checkpointing='sometimes'"):
        estimate_memory(CONFIGS["llama-3.2-1b"], use_gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="num_generations=0"):
        estimate_memory(CONFIGS["llama-3.2-1b"], num_generations=0)


# ---------------------------------------------------------------------------------------------
# vLLM sizing (unsloth_zoo approximate_vllm_memory_usage, vLLM kv_cache_interface)


def test_vllm_kv_per_token_is_vllms_page_formula():
    arch = arch_from_config(CONFIGS["llama-3.1-8b"])
    # vLLM: page = 2 x block_size x kv_heads x head_size x dtype bytes, per layer
    page = 2 * 16 * 8 * 128 * 2
    assert vllm_sizing.kv_bytes_per_token(arch) * 16 == page * 32
    assert vllm_sizing.kv_bytes_per_token(arch) == 128 * 1024  # the well-known 128 KiB


def test_vllm_cuda_graph_allowance_is_clamped_like_unsloth_zoo():
    small = arch_from_config(CONFIGS["qwen2.5-0.5b"])
    big = arch_from_config(CONFIGS["llama-3.1-8b"])
    assert vllm_sizing.cuda_graph_bytes(small) == int(0.15 * GIB)  # floor
    assert vllm_sizing.cuda_graph_bytes(big) == int(0.15 * GIB)  # 172 x 4096 x 32 x 4 < floor
    wide = arch_from_config(
        {**CONFIGS["llama-3.1-8b"], "hidden_size": 8192, "num_hidden_layers": 80}
    )
    assert vllm_sizing.cuda_graph_bytes(wide) == 172 * 8192 * 80 * 4
    huge = arch_from_config(
        {**CONFIGS["llama-3.1-8b"], "hidden_size": 16384, "num_hidden_layers": 126}
    )
    assert vllm_sizing.cuda_graph_bytes(huge) == GIB  # cap


def test_vllm_budget_and_one_sequence_flag():
    cfg = CONFIGS["llama-3.1-8b"]
    ok = estimate_memory(
        cfg, fast_inference=True, gpu_memory_utilization=0.6, gpu_total_memory=80 * GIB, task="grpo"
    )
    assert ok.vllm is not None and ok.vllm.fits_one_sequence
    b = ok.vllm
    assert b.requested_bytes == int(0.6 * 80 * GIB)
    left = b.requested_bytes - b.weights_bytes - b.lora_bytes - b.cuda_graph_bytes
    assert b.kv_tokens == int(0.95 * left / b.kv_bytes_per_token) // 256 * 256
    assert ok.parts["vllm"] == b.requested_bytes - b.weights_bytes
    tight = estimate_memory(
        cfg,
        fast_inference=True,
        gpu_memory_utilization=0.25,
        gpu_total_memory=24 * GIB,
        task="grpo",
        max_completion_length=4096,
    )
    assert tight.vllm is not None and not tight.vllm.fits_one_sequence
    assert any("KV cache holds" in n for n in tight.notes)


def test_vllm_kv_elements_match_unsloth_zoo_when_installed():
    vu = pytest.importorskip("unsloth_zoo.vllm_utils", exc_type=ImportError)
    import transformers

    for name in ("llama-3.1-8b", "qwen3-8b", "qwen2.5-7b"):
        raw = dict(CONFIGS[name])
        cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
        full, _ = vu._kv_cache_elements_per_token(cfg)
        arch = arch_from_config(CONFIGS[name])
        assert full * 2 == vllm_sizing.kv_bytes_per_token(arch)


# ---------------------------------------------------------------------------------------------
# What fits, speed, CLI


def test_largest_fitting_is_a_monotone_search():
    assert largest_fitting(lambda n: n * n <= 50, 1, 100) == 7
    assert largest_fitting(lambda n: False, 1, 100) is None


def test_what_fits_brings_the_estimate_under_the_budget():
    cfg = CONFIGS["llama-3.1-8b"]
    settings: dict[str, Any] = {
        "task": "grpo",
        "num_generations": 16,
        "max_completion_length": 2048,
    }
    budget = 24 * GIB
    assert estimate_memory(cfg, **settings).total_bytes > budget
    found = what_fits(cfg, settings, budget)
    g, c = found["num_generations"], found["max_completion_length"]
    assert 2 <= g < 16 and 1 <= c < 2048
    assert estimate_memory(cfg, **{**settings, "num_generations": g}).total_bytes <= budget
    assert estimate_memory(cfg, **{**settings, "num_generations": g + 1}).total_bytes > budget
    assert estimate_memory(cfg, **{**settings, "max_completion_length": c}).total_bytes <= budget


def test_estimate_is_fast_and_imports_no_torch(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["qwen3-8b"]))
    code = (
        "import sys, time\n"
        "from pytest_unsloth.fit import estimate_memory\n"
        f"p = {str(tmp_path)!r}\n"
        "estimate_memory(p)\n"
        "t = time.perf_counter()\n"
        "for _ in range(20): estimate_memory(p, task='grpo', fast_inference=True)\n"
        "print((time.perf_counter() - t) / 20)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 0.05


def test_cli_table_json_and_budget(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama-3.1-8b"]))
    table = fit_cli(str(tmp_path), "--task", "grpo", "--num_generations", "8")
    assert table.returncode == 0, table.stderr
    assert "weights" in table.stdout and "total" in table.stdout
    out = fit_cli(str(tmp_path / "config.json"), "--json", "--max-seq-length", "4096")
    data = json.loads(out.stdout)
    assert data["total_bytes"] == sum(data["parts"].values())
    assert (
        data["total_bytes"]
        == estimate_memory(CONFIGS["llama-3.1-8b"], max_seq_length=4096).total_bytes
    )
    over = fit_cli(
        str(tmp_path),
        "--task",
        "grpo",
        "--num_generations",
        "16",
        "--max_completion_length",
        "2048",
        "--budget",
        "24GiB",
    )
    assert over.returncode == 1 and "settings that fit: num_generations <= " in over.stdout


def test_cli_bad_input_is_a_usage_error(tmp_path: Path):
    missing = fit_cli(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nope" in missing.stderr
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama-3.1-8b"]))
    bad = fit_cli(str(tmp_path), "--optim", "lion9000")
    assert bad.returncode == 2 and "optim='lion9000'" in bad.stderr


def test_grid_script_smoke_on_cpu(tmp_path: Path):
    pytest.importorskip("peft")
    out = tmp_path / "grid.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fit_grid.py"),
            "--device",
            "cpu",
            "--tiny",
            "--only",
            "0@1.5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["ok"] and rec["trainable_params"] > 0, rec
    # each record says which allocator setting and which cap (INDEX@GIB) it ran under
    assert rec["alloc_conf"] == "expandable_segments:True" and rec["cap_bytes"] == 1.5 * GIB


# ---------------------------------------------------------------------------------------------
# unsloth-env::fit and requires_fit


def _model_dir(pytester: pytest.Pytester, name: str = "llama-3.1-8b") -> Path:
    folder = pytester.path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return folder


def test_fit_check_without_gpu_passes_with_the_figure(pytester: pytest.Pytester):
    _model_dir(pytester)
    pytester.makeini("[pytest]\nunsloth_model = model\nunsloth_fit_target = 80GiB\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*~*GiB fits the fit target 80 GiB*"])


def test_fit_check_fails_a_too_small_target_with_the_fix(pytester: pytest.Pytester):
    _model_dir(pytester)
    pytester.makeini(
        "[pytest]\nunsloth_model = model\nunsloth_fit_target = 12GiB\n"
        "unsloth_max_seq_length = 2048\n"
        "unsloth_grpo_config =\n    num_generations = 16\n    max_completion_length = 2048\n"
    )
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "one training step needs ~" in out and "more than the fit target 12 GiB" in out
    assert "biggest: logits" in out and "settings that fit now: num_generations <= " in out
    assert "Traceback" not in out


def test_fit_check_flags_a_vllm_budget_too_small_for_one_sequence(pytester: pytest.Pytester):
    _model_dir(pytester)
    pytester.makeini(
        "[pytest]\nunsloth_model = model\nunsloth_fit_target = 24GiB\n"
        "unsloth_fast_inference = true\nunsloth_gpu_memory_utilization = 0.25\n"
        "unsloth_grpo_config =\n    max_completion_length = 8192\n"
    )
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*less than one sequence of*tokens*"])


def test_fit_check_compares_with_free_gpu_memory(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
):
    fake_nvml(gpus=[L4])
    _model_dir(pytester)
    pytester.makeini(
        "[pytest]\nunsloth_model = model\nunsloth_max_seq_length = 4096\n"
        "unsloth_fit_settings =\n    stack = transformers\n"
        "    use_gradient_checkpointing = false\n"
    )
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*cuda:0 (NVIDIA L4) has 14.7 GiB free*"])


def _fit_detail(pytester: pytest.Pytester, target: str, extra: str = "") -> str:
    pytester.makeini(f"[pytest]\nunsloth_model = model\nunsloth_fit_target = {target}\n{extra}")
    report = pytester.path / f"fit-{target}.json"
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=fit", f"--unsloth-report={report}"
    )
    result.assert_outcomes(passed=1)
    (check,) = [c for c in json.loads(report.read_text())["checks"] if c["name"] == "fit"]
    return str(check["message"])


def test_fit_check_calls_a_fit_inside_the_estimate_band_a_close_call(pytester: pytest.Pytester):
    _model_dir(pytester)
    roomy = _fit_detail(pytester, "200GiB")
    assert "close call" not in roomy
    need = float(re.search(r"~([0-9.]+) GiB fits", roomy).group(1))  # type: ignore[union-attr]
    close = _fit_detail(pytester, f"{need * 1.05 + 0.05:.2f}GiB")
    assert "close call" in close and "may still run out of memory" in close
    assert "close call" not in _fit_detail(pytester, f"{need * 1.2 + 0.1:.2f}GiB")
    # unsloth turns expandable segments on itself: no allocator hint for the default stack
    assert "expandable_segments" not in close


def test_close_call_with_plain_transformers_names_the_allocator_setting(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    _model_dir(pytester)
    stack = "unsloth_fit_settings =\n    stack = transformers\n"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    roomy = _fit_detail(pytester, "200GiB", stack)
    need = float(re.search(r"~([0-9.]+) GiB fits", roomy).group(1))  # type: ignore[union-attr]
    target = f"{need * 1.05 + 0.05:.2f}GiB"
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in _fit_detail(
        pytester, target, stack
    )
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "expandable_segments:True")
        close = _fit_detail(pytester, target, stack)
        assert "close call" in close and "expandable_segments" not in close
        monkeypatch.delenv(name)


def test_fit_check_skips_without_a_model(pytester: pytest.Pytester):
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*set unsloth_model*"])


def test_bad_fit_settings_are_a_usage_error(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_fit_settings =\n    optim = lion9000\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unsloth_fit_settings" in result.stderr.str() and "lion9000" in result.stderr.str()


def test_requires_fit_skips_with_estimate_and_free_memory(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
):
    fake_nvml(gpus=[L4])
    _model_dir(pytester)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_fit(model="model", task="grpo", num_generations=16,
                                  max_completion_length=2048)
        def test_big():
            pass

        @pytest.mark.requires_fit(model="model", max_seq_length=256)
        def test_small():
            pass
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*needs ~*GiB (estimate: logits *, weights *), has 14.7 GiB free on cuda:0 (NVIDIA L4)*"]
    )
    strict = pytester.runpytest("--unsloth-strict-skips")
    # a requires_* marker acts in setup: strict mode turns the skip into a setup error
    strict.assert_outcomes(passed=1, errors=1)


def test_requires_fit_without_gpu_and_bad_arguments(pytester: pytest.Pytester):
    _model_dir(pytester)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_fit(model="model")
        def test_needs_gpu():
            pass

        @pytest.mark.requires_fit(model="model", num_generation=4)
        def test_typo():
            pass

        @pytest.mark.requires_fit(model="missing-folder/x/y")
        def test_missing():
            pass
        """
    )
    result = pytester.runpytest("-rs", "-p", "no:randomly")
    result.assert_outcomes(skipped=1, errors=2)
    out = result.stdout.str()
    assert "needs ~" in out and "on an NVIDIA GPU, but" in out
    assert "unknown setting 'num_generation'" in out
    assert "requires_fit(model, *, device=None, **settings)" in out


@pytest.mark.gpu
@pytest.mark.parametrize("index", [12, 14])
def test_fresh_measurement_on_the_gpu_stays_in_band(tmp_path: Path, index: int):
    # grid point 12: llama-3.2-1b bf16 SFT; 14: llama-3.1-8b 4-bit SFT, 4096 tokens
    out = tmp_path / "grid.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fit_grid.py"),
            "--only",
            str(index),
            "--out",
            str(out),
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # the grid's measure: the reserved peak with expandable segments (README, "Will it fit?")
        env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["ok"], rec.get("error")
    print(f"measured {rec['peak_total'] / GIB:.2f} GiB, estimate error {_err(rec):+.1%}")
    assert abs(_err(rec)) <= BAND
