"""The model fixtures as a user meets them: inline pytester sessions on CPU with tiny models."""

from __future__ import annotations

import importlib.util
import sys
import xml.etree.ElementTree as ET

import pytest

STACK = ("torch", "transformers", "bitsandbytes", "peft")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in STACK),
        reason="needs torch, transformers, bitsandbytes and peft",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _ml_stack_stays_imported(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Import the ML stack here, before any inline run.

    pytester removes the modules an inline run imported when it ends; a second run would then
    import torch and bitsandbytes (which registers torch ops) again in this process, and that
    crashes. Modules imported before the run are kept. A load with LoRA of each architecture
    the tests use pulls in the lazily imported transformers and peft modules too.
    """
    from pytest_unsloth.models import loader as models
    from pytest_unsloth.models import lora

    for arch in ("llama", "qwen2", "mistral", "gemma", "qwen3"):
        loaded = models.load_4bit(
            models.ModelRequest(f"tiny:{arch}"), tiny_cache_dir=tmp_path_factory.mktemp(arch)
        )
        lora.remove_lora(lora.apply_lora(loaded, lora.LoraSettings()))
        models.release(loaded)


RESOLVED = """
    def test_model(loaded_4bit_model):
        print("\\nPATH", loaded_4bit_model.path)
        print("SOURCE", loaded_4bit_model.request.source)
"""


def _lines(result: pytest.RunResult, prefix: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in result.outlines if line.startswith(prefix + " ")]


def test_default_tiny_model_reported_in_output_and_junit(pytester: pytest.Pytester) -> None:
    """No configuration: a tiny llama on transformers+bnb; backend in the output and junit."""
    pytester.makepyfile(
        """
        import torch

        def test_forward(loaded_4bit_model):
            model, tokenizer = loaded_4bit_model
            assert loaded_4bit_model.model is model
            batch = tokenizer(["hi there"], return_tensors="pt")
            with torch.no_grad():
                assert model(**batch).logits.shape[0] == 1

        def test_fails(loaded_4bit_model):
            assert False, "user failure"
        """
    )
    result = pytester.runpytest("--junitxml=junit.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured unsloth model setup*",
            "transformers backend (unsloth not installed): tiny:llama (*tiny-llama-small-seed0-v1)"
            " from the default tiny model; 14 of 15 Linear layers 4-bit, float32, cpu, "
            "max_seq_length 256, loaded in * s (reused from the session cache)",
            "*- unsloth models -*",
            "transformers backend (unsloth not installed): tiny:llama*",
        ]
    )
    root = ET.parse(pytester.path / "junit.xml").getroot()
    props = {
        (case.get("name"), p.get("name")): p.get("value")
        for case in root.iter("testcase")
        for p in case.iter("property")
    }
    assert props[("test_forward", "unsloth_backend")] == "transformers"
    assert props[("test_fails", "unsloth_backend")] == "transformers"
    assert "tiny-llama-small" in str(props[("test_forward", "unsloth_model_path")])


def test_twenty_tests_share_one_load(pytester: pytest.Pytester) -> None:
    """The session cache: 20 tests, one load."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(20))
        def test_uses_model(loaded_4bit_model, i):
            assert loaded_4bit_model.quantized_layers == 14

        def test_zz_count(unsloth_model_cache):
            assert unsloth_model_cache.loads == 1
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=21)


def test_resolution_order(pytester: pytest.Pytester) -> None:
    """marker > unsloth_model_name fixture > --unsloth-model > ini > tiny default."""
    pytester.makeini("[pytest]\nunsloth_model = tiny:mistral\n")
    pytester.makepyfile(
        test_a_plain=RESOLVED,
        test_b_fixture="""
            import pytest

            @pytest.fixture
            def unsloth_model_name():
                return "tiny:gemma"

            def test_model(loaded_4bit_model):
                print("\\nPATH", loaded_4bit_model.path)
                print("SOURCE", loaded_4bit_model.request.source)

            @pytest.mark.unsloth_model("tiny:qwen3", max_seq_length=128)
            def test_marker(loaded_4bit_model):
                assert loaded_4bit_model.max_seq_length == 128
                print("\\nPATH", loaded_4bit_model.path)
                print("SOURCE", loaded_4bit_model.request.source)
        """,
    )
    cli = pytester.runpytest("-s", "-p", "no:cacheprovider", "--unsloth-model", "tiny:qwen2")
    cli.assert_outcomes(passed=3)
    paths = [p.rsplit("/", 1)[-1] for p in _lines(cli, "PATH")]
    assert paths == [
        "tiny-qwen2-small-seed0-v1",
        "tiny-gemma-small-seed0-v1",
        "tiny-qwen3-small-seed0-v1",
    ]
    assert _lines(cli, "SOURCE") == [
        "--unsloth-model",
        "fixture unsloth_model_name",
        "@pytest.mark.unsloth_model on test_marker",
    ]
    ini = pytester.runpytest("-s", "-p", "no:cacheprovider", "test_a_plain.py")
    ini.assert_outcomes(passed=1)
    assert _lines(ini, "PATH")[0].endswith("tiny-mistral-small-seed0-v1")
    assert _lines(ini, "SOURCE") == ["ini unsloth_model in tox.ini"]
    (pytester.path / "tox.ini").unlink()
    default = pytester.runpytest("-s", "-p", "no:cacheprovider", "test_a_plain.py")
    default.assert_outcomes(passed=1)
    assert _lines(default, "PATH")[0].endswith("tiny-llama-small-seed0-v1")
    assert _lines(default, "SOURCE") == ["the default tiny model"]


def test_marker_load_options_and_misuse(pytester: pytest.Pytester) -> None:
    """Marker keywords override load options; misuse errors that one test with the fix."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.unsloth_model(max_seq_length=64, dtype="bf16", backend="transformers")
        def test_options(loaded_4bit_model):
            assert loaded_4bit_model.max_seq_length == 64
            assert loaded_4bit_model.dtype == "bfloat16"
            assert loaded_4bit_model.model.model.embed_tokens.weight.dtype.is_floating_point

        @pytest.mark.unsloth_model(max_seq_len=64)
        def test_bad_keyword(loaded_4bit_model):
            pass

        @pytest.mark.unsloth_model("tiny:llama", "extra")
        def test_two_names(loaded_4bit_model):
            pass

        @pytest.mark.unsloth_model(dtype="int4")
        def test_bad_dtype(loaded_4bit_model):
            pass

        @pytest.mark.unsloth_model(backend="vllm")
        def test_bad_backend(loaded_4bit_model):
            pass

        @pytest.mark.unsloth_model(max_seq_length="long")
        def test_bad_length(loaded_4bit_model):
            pass

        def test_unaffected(loaded_4bit_model):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=5)
    result.stdout.fnmatch_lines(
        [
            "*test_bad_keyword: bad @pytest.mark.unsloth_model arguments: got an unexpected "
            "keyword argument 'max_seq_len'. Signature: unsloth_model(name_or_path=None, *, "
            "max_seq_length=None, *",
            "*test_two_names: bad @pytest.mark.unsloth_model arguments: too many positional*",
            "*unsloth_model(dtype='int4'): dtype must be one of auto, bfloat16, float16, float32",
            "*unsloth_model(backend='vllm'): backend must be one of auto, unsloth, transformers",
            "*unsloth_model(max_seq_length='long'): max_seq_length must be a positive int",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_markers_help_line(pytester: pytest.Pytester) -> None:
    """pytest --markers shows the marker like its signature."""
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.unsloth_model(name_or_path=None, *, max_seq_length=None, dtype=None, *"]
    )


def test_missing_model_fails_fast_once(pytester: pytest.Pytester) -> None:
    """A nonexistent --unsloth-model errors each test at once; the load is tried once."""
    pytester.makepyfile(
        """
        def test_one(loaded_4bit_model):
            pass

        def test_two(loaded_4bit_model):
            pass

        def test_no_model():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--unsloth-model", "./no/such/model")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_one: model path './no/such/model' (from --unsloth-model) does not exist*",
            "*test_two: model path './no/such/model' *(same failure as the first attempt)",
        ]
    )


# The inner run must show the plugin's warning, not turn it into an error (pyproject's filter).
@pytest.mark.filterwarnings("default::pytest.PytestWarning:pytest_unsloth")
def test_peft_adapters_never_leak_into_the_next_test(pytester: pytest.Pytester) -> None:
    """peft_model trains, then the shared model is clean and not reloaded; a test that adds
    its own adapters is named in a warning and the next test gets a fresh model."""
    pytester.makepyfile(
        """
        import torch

        def lora_modules(model):
            return [n for n, _ in model.named_modules() if "lora_" in n]

        def test_1_train(peft_model, loaded_4bit_model):
            tok = loaded_4bit_model.tokenizer
            batch = tok(["What is 2 + 3?", "5"], return_tensors="pt", padding=True)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-2)
            peft_model.train()
            loss = peft_model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            assert lora_modules(loaded_4bit_model.model)

        def test_2_clean(loaded_4bit_model, unsloth_model_cache):
            assert lora_modules(loaded_4bit_model.model) == []
            assert not loaded_4bit_model.model.training
            assert unsloth_model_cache.loads == 1

        def test_3_own_adapters(loaded_4bit_model):
            import peft
            peft.get_peft_model(loaded_4bit_model.model, peft.LoraConfig(target_modules=["q_proj"]))

        def test_4_reloaded(loaded_4bit_model, unsloth_model_cache):
            assert lora_modules(loaded_4bit_model.model) == []
            assert unsloth_model_cache.loads == 2
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_3_own_adapters changed the shared 4-bit model (modules replaced*; it is "
            "reloaded for the next test. Use the peft_model fixture*",
            "*Captured unsloth lora setup*",
            "LoRA r=8 alpha=16 dropout=0.0 on q_proj, k_proj, v_proj, o_proj: 8 layers, "
            "16 LoRA tensors, 28672 trainable parameters, gradient checkpointing on*",
        ]
    )


def test_lora_settings_from_ini_and_typo(pytester: pytest.Pytester) -> None:
    """ini LoRA settings reach peft; a typo'd target errors peft tests only, listing names."""
    pytester.makeini(
        """
        [pytest]
        unsloth_lora_r = 4
        unsloth_lora_alpha = 32
        unsloth_lora_target_modules = q_proj v_proj_
        """
    )
    pytester.makepyfile(
        """
        def test_peft(peft_model):
            pass

        def test_base(loaded_4bit_model):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_peft: LoRA target module 'v_proj_' matched no module of LlamaForCausalLM, so "
            "no adapter would be trained there. Linear modules that exist: down_proj, gate_proj, "
            "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj. 'v_proj_' -> did you mean "
            "'v_proj'?. Fix the names in --unsloth-lora-target-modules / ini "
            "unsloth_lora_target_modules"
        ]
    )
    pytester.makeini(
        """
        [pytest]
        unsloth_lora_r = 4
        unsloth_lora_alpha = 32
        unsloth_gradient_checkpointing = false
        """
    )
    pytester.makepyfile(
        """
        def test_peft(peft_model):
            config = peft_model.peft_config["default"]
            assert (config.r, config.lora_alpha) == (4, 32)
            assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*gradient checkpointing off"])


def test_lora_settings_fixture_can_be_overridden(pytester: pytest.Pytester) -> None:
    """unsloth_lora_settings is a plain fixture: override (or parametrize) it per module."""
    pytester.makepyfile(
        """
        import dataclasses
        import pytest

        @pytest.fixture(params=[("q_proj",), ("all-linear",)])
        def unsloth_lora_settings(request):
            from pytest_unsloth.models.lora import LoraSettings
            return LoraSettings(r=2, target_modules=request.param)

        def test_peft(peft_model, unsloth_lora_settings):
            layers = [n for n, m in peft_model.named_modules() if n.endswith("lora_A")]
            expected = 2 if unsloth_lora_settings.target_modules == ("q_proj",) else 14
            assert len(layers) == expected
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_model_kept_by_a_test_fails_the_release(pytester: pytest.Pytester) -> None:
    """A test that keeps the model in a global makes the session's release check fail."""
    pytester.makepyfile(
        """
        KEPT = []

        def test_keeps(loaded_4bit_model):
            KEPT.append(loaded_4bit_model.model)

        def test_last():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_last*",
            "'tiny:llama' (transformers backend) is still referenced after teardown (by: list)*",
        ]
    )


def test_failed_test_does_not_look_like_a_leak(pytester: pytest.Pytester) -> None:
    """A failing last test keeps its frame in sys.last_traceback; that is not reported as a leak."""
    pytester.makepyfile(
        """
        def test_fails(loaded_4bit_model):
            model = loaded_4bit_model.model
            assert model is None
        """
    )
    # A subprocess: an inline run's hook recorder keeps the failure's call info (and frames).
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    assert "still referenced" not in result.stdout.str()


def test_bad_unsloth_model_name_fixture(pytester: pytest.Pytester) -> None:
    """An override that returns something other than a name errors with what it returned."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def unsloth_model_name():
            return 42

        def test_model(loaded_4bit_model):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the unsloth_model_name fixture returned 42; it must return a model name or path*"]
    )


def test_import_first_without_unsloth_warns(pytester: pytest.Pytester) -> None:
    """--unsloth-import-first where unsloth is not installed: a config warning, no failure."""
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--unsloth-import-first")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*PytestConfigWarning: pytest-unsloth: --unsloth-import-first asks to import unsloth "
            "first, but unsloth is not installed; nothing was imported"
        ]
    )


def test_fixtures_module_imports_nothing_heavy(pytester: pytest.Pytester) -> None:
    """The fixtures plugin is imported at configure time of every run: stdlib and pytest only."""
    result = pytester.run(
        sys.executable,
        "-c",
        "import sys, pytest_unsloth.fixtures, pytest_unsloth.models.loader, "
        "pytest_unsloth.models.tiny; "
        "heavy = ('torch', 'transformers', 'peft', 'bitsandbytes', 'tokenizers', 'unsloth'); "
        "print(sorted(m for m in heavy if m in sys.modules))",
        timeout=60,
    )
    assert result.ret == 0, result.stderr.str()
    assert result.stdout.lines[-1] == "[]"
