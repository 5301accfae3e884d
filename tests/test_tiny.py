"""Tiny offline models: every architecture builds, loads, generates; builds are deterministic."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import re
import sys
import time

import pytest

from pytest_unsloth.models import tiny

pytestmark = pytest.mark.slow

# Building a model needs the ML stack; argument checks and import cost do not (tox minimal env).
needs_stack = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "tokenizers")),
    reason="needs torch, transformers and tokenizers",
)


def _digest(folder: pathlib.Path) -> str:
    """Hash every file name and byte of a folder."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One cache folder for the module, so each architecture is built once."""
    return tmp_path_factory.mktemp("tiny-cache")


@needs_stack
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_every_architecture_loads_and_generates(arch: str, cache: pathlib.Path) -> None:
    """The folder is a complete checkpoint: transformers loads it offline and it generates."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny.build(arch, cache_dir=cache)
    assert tiny.is_tiny_model(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch
    assert config.hidden_size == 256
    assert config.num_attention_heads == 4
    assert config.num_key_value_heads == 2
    tokenizer = tiny.load_tokenizer(path)
    assert config.vocab_size >= len(tokenizer)
    assert config.vocab_size % 64 == 0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape[1] > len(ids)


@needs_stack
def test_tokenizer_has_special_tokens_and_chat_template(cache: pathlib.Path) -> None:
    """pad, bos and eos are distinct real tokens and the chat template renders ChatML."""
    tokenizer = tiny.load_tokenizer(tiny.build("llama", cache_dir=cache))
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        tiny.PAD_TOKEN,
        tiny.BOS_TOKEN,
        tiny.EOS_TOKEN,
    )
    special = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(special) == 3
    assert None not in special
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}],
        tokenize=False,
    )
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    # Special tokens stay single ids, and ordinary text round-trips (byte-level BPE).
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids
    sample = "Ünïcödé 3.14159 <answer>7</answer>\n\ttabs"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


@needs_stack
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_auto_tokenizer_encodes_like_the_saved_tokenizer(arch: str, cache: pathlib.Path) -> None:
    """AutoTokenizer (what unsloth uses) rebuilds qwen2 tokenizers; ids must still agree."""
    from transformers import AutoTokenizer

    path = tiny.build(arch, cache_dir=cache)
    ours = tiny.load_tokenizer(path)
    auto = AutoTokenizer.from_pretrained(path)
    for text in ["hello world 123", "a\n\nb  c\td", "<|im_start|>user\nhi<|im_end|>"]:
        assert auto(text)["input_ids"] == ours(text)["input_ids"], text
    assert (auto.pad_token_id, auto.eos_token_id) == (ours.pad_token_id, ours.eos_token_id)


@needs_stack
def test_build_is_deterministic_per_seed(tmp_path: pathlib.Path) -> None:
    """Same seed gives byte-identical folders in separate caches; another seed other weights."""
    a = tiny.build("qwen2", cache_dir=tmp_path / "a", seed=3)
    b = tiny.build("qwen2", cache_dir=tmp_path / "b", seed=3)
    c = tiny.build("qwen2", cache_dir=tmp_path / "b", seed=4)
    assert _digest(a) == _digest(b)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    marker = json.loads((a / tiny.MARKER_FILE).read_text())
    assert marker == {"arch": "qwen2", "format_version": 1, "seed": 3, "size": "small"}


@needs_stack
def test_build_is_identical_in_another_process(
    tmp_path: pathlib.Path, pytester: pytest.Pytester
) -> None:
    """A fresh interpreter (new tokenizer training, new init) writes the same bytes."""
    here = tiny.build("gemma", cache_dir=tmp_path / "here", seed=5)
    result = pytester.run(
        sys.executable,
        "-c",
        "import sys; from pytest_unsloth.models import tiny; "
        "print(tiny.build('gemma', cache_dir=sys.argv[1], seed=5))",
        str(tmp_path / "there"),
        timeout=120,
    )
    assert result.ret == 0, result.stderr.str()
    assert _digest(pathlib.Path(result.stdout.lines[-1])) == _digest(here)


@needs_stack
def test_build_reuses_cache_and_leaves_no_staging(tmp_path: pathlib.Path) -> None:
    """A second build returns the same folder without rewriting it; no temp folders remain."""
    first = tiny.build("mistral", cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = tiny.build("mistral", cache_dir=str(tmp_path))
    assert again == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_stack
def test_build_does_not_touch_the_global_torch_seed(tmp_path: pathlib.Path) -> None:
    """Building seeds its own init, and restores the caller's random stream."""
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build("llama", cache_dir=tmp_path, seed=99)
    assert torch.equal(torch.rand(3), expected)


@needs_stack
def test_default_cache_is_a_per_process_temp_folder() -> None:
    """Without cache_dir the folder lives in one temp folder reused by later calls."""
    a = tiny.build("llama")
    b = tiny.build("llama")
    assert a == b
    assert a.parent.name.startswith("pytest-unsloth-tiny-")


@needs_stack
def test_medium_size(tmp_path: pathlib.Path) -> None:
    """The medium size keeps head_dim 64 with more heads and layers."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny.build("llama", cache_dir=tmp_path, size="medium"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 4, 8)


@needs_stack
def test_build_is_fast_after_imports(tmp_path: pathlib.Path) -> None:
    """A fresh build takes well under a second once transformers' model code is imported."""
    tiny.build("llama", cache_dir=tmp_path / "warm")  # imports the modeling code
    start = time.perf_counter()
    tiny.build("llama", cache_dir=tmp_path / "cold", seed=7)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt5"}, "unknown tiny model architecture 'gpt5'; supported: llama, mistral"),
        ({"size": "huge"}, "unknown tiny model size 'huge'; supported: small, medium"),
        ({"seed": "1"}, "tiny model seed must be an int, got '1'"),
    ],
)
def test_bad_arguments_raise_value_error(
    kwargs: dict[str, object], message: str, tmp_path: pathlib.Path
) -> None:
    """Unknown values name themselves and the supported ones; nothing is written."""
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny.build(cache_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@needs_stack
def test_load_tokenizer_names_a_folder_without_tokenizer(tmp_path: pathlib.Path) -> None:
    """A folder without tokenizer.json is a FileNotFoundError naming the folder."""
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in"):
        tiny.load_tokenizer(tmp_path)


def test_importing_tiny_is_light(pytester: pytest.Pytester) -> None:
    """Importing the module loads neither torch nor transformers (build() imports them)."""
    result = pytester.run(
        sys.executable,
        "-c",
        "import sys, pytest_unsloth.models.tiny as t; "
        "assert t.ARCHITECTURES; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))",
        timeout=60,
    )
    assert result.ret == 0, result.stderr.str()
    assert result.stdout.lines[-1] == "[]"
