"""models.py on CPU: real transformers + bitsandbytes NF4 loads, peft LoRA, checks and release.

GPU tests at the end run the unsloth backend in a fresh pytest subprocess (unsloth must be
imported before transformers, which this process has already imported).
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_unsloth.models import loader as models
from pytest_unsloth.models import lora, tiny
from pytest_unsloth.models.loader import (
    LoadedModel,
    ModelCache,
    ModelCheckError,
    ModelLoadError,
    ModelRequest,
)
from pytest_unsloth.models.lora import LoraSettings

for _module in ("torch", "transformers", "bitsandbytes", "peft"):
    pytest.importorskip(_module)  # every test here loads or trains a real model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One tiny-model cache for the module."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def shared(tiny_dir: pathlib.Path) -> Iterator[LoadedModel]:
    """One 4-bit tiny llama for the read-only and LoRA tests of this module."""
    loaded = models.load_4bit(ModelRequest("tiny:llama"), tiny_cache_dir=tiny_dir)
    yield loaded
    models.release(loaded)


def _batch(loaded: LoadedModel) -> dict[str, Any]:
    tok = loaded.tokenizer
    return dict(tok(["What is 2 + 3?", "hello world"], return_tensors="pt", padding=True))


# ----------------------------------------------------------------------------- loading


def test_cpu_load_is_real_nf4_and_verified(shared: LoadedModel) -> None:
    """All 14 decoder Linear layers are NF4 Params4bit; lm_head stays full precision."""
    import bitsandbytes as bnb
    import torch

    assert shared.backend == "transformers"
    assert shared.backend_reason == "unsloth not installed"
    assert (shared.quantized_layers, shared.linear_layers) == (14, 15)
    assert (shared.device, shared.dtype, shared.max_seq_length) == ("cpu", "float32", 256)
    q_proj = shared.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)  # type: ignore[attr-defined]
    assert q_proj.weight.quant_state.quant_type == "nf4"  # type: ignore[attr-defined]
    assert q_proj.weight.dtype == torch.uint8
    assert shared.model.max_seq_length == 256
    model, tokenizer = shared
    assert model is shared.model
    assert tokenizer.pad_token == tiny.PAD_TOKEN
    assert "tiny:llama" in shared.describe()
    assert "14 of 15 Linear layers 4-bit" in shared.describe()
    with torch.no_grad():
        logits = model(**_batch(shared)).logits
    assert torch.isfinite(logits).all()


def test_load_without_4bit_layers_fails(
    tiny_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantization config that skips every layer loads fine in transformers; we fail it."""
    import transformers

    real = transformers.BitsAndBytesConfig
    skip_all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def skipping(**kwargs: Any) -> Any:
        return real(**kwargs, llm_int8_skip_modules=[*skip_all, "lm_head"])  # type: ignore[no-untyped-call]

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", skipping)
    with pytest.raises(ModelCheckError) as info:
        models.load_4bit(ModelRequest("tiny:llama"), tiny_cache_dir=tiny_dir)
    message = str(info.value)
    assert "loaded without 4-bit layers: 0 of 15 Linear layers are bitsandbytes Linear4bit" in (
        message
    )
    assert "model.layers.0.self_attn.q_proj" in message
    assert "fell back to full precision" in message


def test_verify_4bit_rejects_a_full_precision_model(tiny_dir: pathlib.Path) -> None:
    """verify_4bit on an ordinary bf16 model names the 0 quantised layers."""
    from transformers import AutoModelForCausalLM

    path = tiny.build("qwen2", cache_dir=tiny_dir)
    plain = LoadedModel(
        model=AutoModelForCausalLM.from_pretrained(path),
        tokenizer=tiny.load_tokenizer(path),
        request=ModelRequest(str(path)),
        backend="transformers",
        backend_reason="test",
        path=str(path),
        device="cpu",
        dtype="bfloat16",
        max_seq_length=256,
        load_seconds=0.0,
    )
    with pytest.raises(ModelCheckError, match=r"0 of 15 Linear layers"):
        models.verify_4bit(plain)


def test_missing_pad_token_fails(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A tokenizer without pad token is a check failure that names the eos and the fix."""
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny.build("llama", cache_dir=tiny_dir), folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelCheckError) as info:
        models.load_4bit(ModelRequest(str(folder)))
    assert "has no pad token (eos is '<|im_end|>')" in str(info.value)
    assert "add pad_token to the model's tokenizer_config.json" in str(info.value)


def test_max_seq_length_beyond_positions_fails_on_transformers(tiny_dir: pathlib.Path) -> None:
    """Plain transformers cannot stretch RoPE; a too-long max_seq_length is caught at load."""
    with pytest.raises(ModelCheckError, match="max_seq_length 4096 exceeds"):
        models.load_4bit(ModelRequest("tiny:llama", max_seq_length=4096), tiny_cache_dir=tiny_dir)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "model path '/no/such/model' (from test) does not exist"),
        ("./models/llama", "model path './models/llama' (from test) does not exist"),
        ("nobody/no-such-model", "is neither a local folder"),
        ("tiny:gpt5", "bad tiny model name 'tiny:gpt5': use tiny:ARCH"),
        ("tiny:llama:huge", "SIZE one of small, medium"),
    ],
)
def test_bad_model_names_fail_fast(name: str, message: str, tmp_path: pathlib.Path) -> None:
    """Nonexistent paths, uncached Hub ids and bad tiny names fail at once, naming the source."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        models.resolve_model_path(name, source="test", tiny_cache_dir=tmp_path)
    assert message in str(info.value)
    assert time.perf_counter() - start < 2


def test_folder_without_config_fails(tmp_path: pathlib.Path) -> None:
    """An existing folder that is not a checkpoint says what is missing."""
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        models.resolve_model_path(str(tmp_path), source="test")


def test_uncached_hub_id_does_not_wait_on_the_network(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without HF_HUB_OFFLINE, transformers would retry the Hub for ~25-50 s; we answer at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf-home"))
    code = textwrap.dedent(
        """
        import time
        from pytest_unsloth.models import loader as models
        start = time.perf_counter()
        try:
            models.resolve_model_path("nobody/no-such-model")
        except models.ModelLoadError as exc:
            print("ERR", exc)
        print("SECONDS", time.perf_counter() - start)
        """
    )
    result = pytester.run(sys.executable, "-c", code, timeout=60)
    out = result.stdout.str()
    assert "is neither a local folder" in out, out + result.stderr.str()
    assert "--unsloth-allow-download" in out
    seconds = float(out.split("SECONDS")[-1])
    assert seconds < 5


def test_unknown_backend_and_dtype() -> None:
    """Backend and dtype names are validated with the choices."""
    with pytest.raises(ModelLoadError, match="unknown model backend 'vllm'"):
        models.choose_backend("vllm")
    with pytest.raises(ModelLoadError, match="unknown dtype 'int4'"):
        models.load_4bit(ModelRequest("tiny:llama", dtype="int4"))


def test_backend_choice_on_cpu() -> None:
    """No unsloth here: auto picks transformers and says why; forcing unsloth is an error."""
    assert models.choose_backend("auto") == ("transformers", "unsloth not installed")
    assert models.choose_backend("transformers") == ("transformers", "requested")
    with pytest.raises(ModelLoadError, match="unsloth is not installed"):
        models.choose_backend("unsloth")


def test_fast_inference_is_ignored_with_a_warning_on_transformers(tiny_dir: pathlib.Path) -> None:
    """fast_inference needs unsloth + vLLM; a CPU lane sharing the GPU lane's ini still runs."""
    request = ModelRequest("tiny:llama", fast_inference=True)
    with pytest.warns(pytest.PytestWarning, match="fast_inference=True is ignored for 'tiny"):
        loaded = models.load_4bit(request, tiny_cache_dir=tiny_dir)
    models.release(loaded)


def test_import_order_problem_names_the_libraries() -> None:
    """transformers is imported here and unsloth is not: the warning text lists it and the fix."""
    import transformers  # noqa: F401

    problem = models.import_order_problem()
    assert "transformers" in problem
    message = models.import_order_message(problem, when="test")
    assert "--unsloth-import-first" in message
    assert "transformers" in message


# ----------------------------------------------------------------------------- LoRA


def test_lora_one_step_then_clean_removal(shared: LoadedModel) -> None:
    """LoRA adds 16 trainable tensors, a step changes only them, unload restores the base."""
    import torch

    base = shared.model
    before = lora.snapshot_state(base)
    frozen_before = {
        n: p.detach().clone() for n, p in base.named_parameters() if not n.endswith("lm_head")
    }
    applied = lora.apply_lora(shared, LoraSettings())
    assert (applied.lora_layers, applied.lora_tensors) == (8, 16)
    assert applied.gradient_checkpointing.startswith("on (transformers")
    peft_model = applied.model
    lora_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    batch = _batch(shared)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    params = dict(peft_model.named_parameters())
    changed = [n for n, before in lora_b.items() if not torch.equal(params[n], before)]
    assert len(changed) == 8
    assert lora.remove_lora(applied) is True
    assert applied.model is None
    assert lora.snapshot_state(base) == before
    assert lora._lora_layer_names(base) == []
    for name, param in base.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name


def test_inference_first_does_not_break_lora_gradients(shared: LoadedModel) -> None:
    """An eval forward (generate, a check) must not leave layers bitsandbytes cannot train.

    bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 CPUs and then drops
    the gradient through them; the loader switches that layout off, so every adapter trains.
    """
    import torch

    shared.model.eval()
    with torch.no_grad():
        shared.model(**_batch(shared))
    assert models.cpu_packed_layers(shared.model) == []
    applied = lora.apply_lora(shared, LoraSettings(gradient_checkpointing="false"))
    try:
        peft_model = applied.model
        peft_model.train()
        batch = _batch(shared)
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = {
            n: float(p.grad.abs().sum()) for n, p in peft_model.named_parameters() if "lora_B" in n
        }
        assert len(grads) == 8
        assert all(g > 0 for g in grads.values()), grads
    finally:
        assert lora.remove_lora(applied)


def _has_avx512bf16() -> bool:
    import bitsandbytes.functional as bnb_functional

    check = getattr(bnb_functional, "has_avx512bf16", None)
    return bool(check and check())


def test_repacked_model_is_refused_for_lora(tiny_dir: pathlib.Path) -> None:
    """A model bitsandbytes already repacked for CPU inference is refused with the reason."""
    import torch

    if not _has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    loaded = models.load_4bit(ModelRequest("tiny:llama"), tiny_cache_dir=tiny_dir)
    try:
        for module in loaded.model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True  # what a plain transformers load has
        loaded.model.eval()
        with torch.no_grad():
            loaded.model(**_batch(loaded))
        assert len(models.cpu_packed_layers(loaded.model)) == 14
        with pytest.raises(ModelCheckError, match=r"14 4-bit layers .* were repacked"):
            lora.apply_lora(loaded, LoraSettings())
    finally:
        models.release(loaded)


def test_lora_settings_are_applied(shared: LoadedModel) -> None:
    """r, alpha, dropout and checkpointing mode reach peft; all-linear covers the MLP too."""
    settings = LoraSettings(
        r=4, alpha=8, dropout=0.1, target_modules=("all-linear",), gradient_checkpointing="false"
    )
    applied = lora.apply_lora(shared, settings)
    try:
        config = applied.model.peft_config["default"]
        assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
        assert applied.lora_layers == 14  # 7 projections x 2 layers, lm_head excluded
        assert applied.gradient_checkpointing == "off"
        assert not lora.checkpointing_enabled(shared.model)
    finally:
        assert lora.remove_lora(applied)


def test_lora_adapters_are_seeded_without_touching_the_global_stream(
    shared: LoadedModel,
) -> None:
    """The same seed gives the same lora_A; the caller's torch random stream is unchanged."""
    import torch

    def first_lora_a() -> Any:
        applied = lora.apply_lora(shared, LoraSettings())
        value = next(p for n, p in applied.model.named_parameters() if "lora_A" in n).clone()
        assert lora.remove_lora(applied)
        return value

    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    a, b = first_lora_a(), first_lora_a()
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (("q_proj_",), "'q_proj_' -> did you mean 'q_proj'?"),
        (("q_proj", "k_proj_"), "LoRA target module 'k_proj_' matched no module of"),
        (("qkv",), "LoRA target module 'qkv' matched no module"),
    ],
)
def test_typo_in_target_modules_lists_existing_names(
    shared: LoadedModel, targets: tuple[str, ...], expected: str
) -> None:
    """A target that matches nothing fails before peft runs, listing the Linear modules."""
    before = lora.snapshot_state(shared.model)
    with pytest.raises(ModelCheckError) as info:
        lora.apply_lora(shared, LoraSettings(target_modules=targets))
    message = str(info.value)
    assert expected in message
    assert "Linear modules that exist: down_proj, gate_proj, k_proj, lm_head, o_proj," in message
    assert "unsloth_lora_target_modules" in message
    assert lora.snapshot_state(shared.model) == before


def test_peft_alone_accepts_a_partial_typo(tiny_dir: pathlib.Path) -> None:
    """Why the check above exists: peft silently adapts only the names that matched."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.build("llama", cache_dir=tiny_dir))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "k_proj_"]))
    assert len(lora._lora_layer_names(wrapped)) == 2  # q_proj x 2 layers, k_proj_ ignored


def test_verify_lora_catches_trainable_base_and_frozen_adapters(shared: LoadedModel) -> None:
    """Unfrozen base weights or frozen adapters are named."""
    applied = lora.apply_lora(shared, LoraSettings(target_modules=("q_proj",)))
    matched = {"q_proj": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]}
    try:
        norm = shared.model.model.norm.weight
        norm.requires_grad_(True)
        with pytest.raises(ModelCheckError, match=r"1 base-model parameters are trainable"):
            lora.verify_lora(applied, matched)
        norm.requires_grad_(False)
        lora_a = next(p for n, p in applied.model.named_parameters() if "lora_A" in n)
        lora_a.requires_grad_(False)
        with pytest.raises(ModelCheckError, match=r"1 LoRA tensors are frozen"):
            lora.verify_lora(applied, matched)
        lora_a.requires_grad_(True)
        with pytest.raises(ModelCheckError, match=r"landed on 2 modules, expected 3"):
            lora.verify_lora(applied, {**matched, "k_proj": ["model.layers.0.self_attn.k_proj"]})
    finally:
        assert lora.remove_lora(applied)


def test_bad_lora_values(shared: LoadedModel) -> None:
    """r, dropout and the checkpointing mode are validated with the value."""
    with pytest.raises(ModelCheckError, match="LoRA r must be positive, got 0"):
        lora.apply_lora(shared, LoraSettings(r=0))
    with pytest.raises(ModelCheckError, match=r"dropout must be in \[0, 1\), got 1.5"):
        lora.apply_lora(shared, LoraSettings(dropout=1.5))
    with pytest.raises(ModelCheckError, match="unknown gradient checkpointing mode 'yes'"):
        lora.apply_lora(shared, LoraSettings(gradient_checkpointing="yes"))


# ----------------------------------------------------------------------------- release, cache


def test_release_frees_the_model(tiny_dir: pathlib.Path) -> None:
    """After release nothing keeps the model: the handle is emptied and the object collected."""
    loaded = models.load_4bit(ModelRequest("tiny:qwen2"), tiny_cache_dir=tiny_dir)
    ref = weakref.ref(loaded.model)
    models.release(loaded)
    assert loaded.released
    assert loaded.model is None
    assert loaded.tokenizer is None
    assert ref() is None
    models.release(loaded)  # idempotent


_kept: list[Any] = []


def test_release_names_what_still_holds_the_model(tiny_dir: pathlib.Path) -> None:
    """A model kept in a global (a common leak) fails the release with its holder's type."""
    loaded = models.load_4bit(ModelRequest("tiny:qwen2"), tiny_cache_dir=tiny_dir)
    holder = {"model": loaded.model}
    _kept.append(holder)
    try:
        with pytest.raises(ModelCheckError) as info:
            models.release(loaded)
        assert "is still referenced after teardown (by: dict)" in str(info.value)
        assert "module globals" in str(info.value)
    finally:
        _kept.clear()
        gc.collect()


def test_cache_loads_once_per_configuration(tiny_dir: pathlib.Path) -> None:
    """Equal requests share a load; another one replaces it (one resident); failures stick."""
    cache = ModelCache(tiny_cache_dir=tiny_dir)
    first = cache.get(ModelRequest("tiny:llama", source="a"))
    assert cache.get(ModelRequest("tiny:llama", source="b")) is first
    assert cache.loads == 1
    second = cache.get(ModelRequest("tiny:llama", max_seq_length=128))
    assert first.released
    assert second.max_seq_length == 128
    assert cache.loads == 2
    with pytest.raises(ModelLoadError):
        cache.get(ModelRequest("/no/such/model"))
    with pytest.raises(ModelLoadError, match="same failure as the first attempt"):
        cache.get(ModelRequest("/no/such/model"))
    assert cache.close() == []
    assert second.released


def test_state_change_is_described() -> None:
    """The snapshot diff says what a test changed."""
    before = ((("a", "Linear"),), (("w", False),), False, False, False)
    after = ((("a", "LoraLinear"),), (("w", True),), True, True, True)
    text = lora.describe_state_change(before, after)
    assert text == (
        "modules replaced (new types: LoraLinear); requires_grad changed on 1 parameters; "
        "train/eval mode changed; gradient checkpointing switched; peft_config added"
    )
    assert lora.describe_state_change(before, before) == "no change"


# ----------------------------------------------------------------------------- GPU (unsloth)

GPU_TEST = textwrap.dedent(
    """
    import gc, pytest, torch

    def _step(model, tokenizer):
        batch = tokenizer(["What is 2 + 3?", "hello world"], return_tensors="pt", padding=True)
        batch = {k: v.to("cuda") for k, v in batch.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(2):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, params))

    @pytest.mark.parametrize("arch", ["llama", "qwen2"])
    def test_unsloth_4bit_lora_step_and_release(arch):
        from pytest_unsloth.models import loader as models, lora
        baseline = torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0
        loaded = models.load_4bit(models.ModelRequest(f"tiny:{arch}"))
        assert loaded.backend == "unsloth", loaded.describe()
        assert loaded.device == "cuda"
        assert loaded.quantized_layers > 0, loaded.describe()
        print(loaded.describe())
        applied = lora.apply_lora(loaded, lora.LoraSettings())
        assert applied.lora_tensors == 16
        assert applied.gradient_checkpointing == "unsloth"
        print(applied.describe())
        _step(applied.model, loaded.tokenizer)
        assert lora.remove_lora(applied) is False  # unsloth: base is released, not reused
        peak = torch.cuda.max_memory_allocated()
        models.release(loaded)  # raises if memory did not come back
        gc.collect()
        after = torch.cuda.memory_allocated()
        print(f"baseline {baseline} peak {peak} after {after}")
        assert after - baseline < 16 * 2**20

    def test_fixtures_on_unsloth(peft_model, loaded_4bit_model):
        assert loaded_4bit_model.backend == "unsloth"
        _step(peft_model, loaded_4bit_model.tokenizer)

    def test_fixture_after_peft_reloads(loaded_4bit_model):
        assert loaded_4bit_model.backend == "unsloth"
        assert not any("lora" in n for n, _ in loaded_4bit_model.model.named_modules())
    """
)


@pytest.mark.gpu
def test_unsloth_backend_on_gpu(pytester: pytest.Pytester) -> None:
    """unsloth path on tiny llama and qwen2: 4-bit load, LoRA, training steps, memory returned."""
    pytester.makepyfile(test_unsloth_gpu=GPU_TEST)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--unsloth-import-first", "-s", "-rA", "-W",
        "error::pytest_unsloth.models.UnslothImportOrderWarning", timeout=580,
    )  # fmt: skip
    log = result.stdout.str() + result.stderr.str()
    # Kept under docs/gpu-runs/ (issue 4) and, on the lent machine, under $OUT to come back.
    folders = [pathlib.Path(__file__).parent.parent / "docs" / "gpu-runs"]
    if os.environ.get("OUT"):
        folders.append(pathlib.Path(os.environ["OUT"]) / "gpu-runs")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-fixtures-unsloth.log").write_text(log)
    result.assert_outcomes(passed=4)
    assert "unsloth backend (unsloth installed, CUDA available)" in log
