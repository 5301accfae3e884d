"""Offline tiny causal language models: random weights of real architectures, a local tokenizer.

``build("qwen2")`` writes a folder that ``from_pretrained`` (transformers or unsloth) loads like a
Hub checkpoint: ``config.json``, ``model.safetensors``, ``generation_config.json`` and a fast
byte-level BPE tokenizer trained here on generated text, with pad/bos/eos tokens and a ChatML chat
template. Nothing is downloaded. The same (arch, size, seed) gives byte-identical files.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import pathlib
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SIZES",
    "build",
    "is_tiny_model",
    "load_tokenizer",
]

# Bumped whenever the files build() writes change, so an old cache folder is never reused.
FORMAT_VERSION = 1

# Written into every built folder; its presence marks a tiny model (and a complete build).
MARKER_FILE = "pytest_unsloth_tiny.json"

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

# Head sizes follow real checkpoints (head_dim 64, grouped KV heads) because unsloth's fused
# kernels are specialised on them; depth and width are what keep CPU tests in seconds.
SIZES: dict[str, dict[str, int]] = {
    "small": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    "medium": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
    },
}

# An upper bound: the generated corpus runs out of merges first (791 tokens today); the model's
# embedding is the tokenizer length rounded up to a multiple of 64.
VOCAB_SIZE = 1024
MAX_POSITION_EMBEDDINGS = 2048
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
# ChatML end-of-turn doubles as EOS (as in Qwen's instruct models), so generation stops at the
# end of an assistant turn.
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, UNK_TOKEN)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an of to and in is it that for on with as was be by this are or from at which "
    "model train data token reward answer question number sum total step loss gradient "
    "batch length prompt completion user assistant system think reason because so then "
    "first second third next last add subtract multiply divide equals result check value "
    "cat dog tree river house city book table water light small large fast slow good bad "
    "yes no true false maybe please thanks hello world python code test function return"
)

_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_lock = threading.Lock()
_default_cache: pathlib.Path | None = None


def _default_cache_dir() -> pathlib.Path:
    """Return this process's temporary cache folder, created on first use, removed at exit."""
    global _default_cache
    with _lock:
        if _default_cache is None:
            _default_cache = pathlib.Path(tempfile.mkdtemp(prefix="pytest-unsloth-tiny-"))
            atexit.register(shutil.rmtree, _default_cache, ignore_errors=True)
        return _default_cache


def _corpus() -> list[str]:
    """Generate the fixed training text: words, numbers, punctuation and chat markup."""
    rng = random.Random(1234)
    words_pool = _WORD_TEXT.split()
    lines: list[str] = []
    for i in range(1500):
        words = [rng.choice(words_pool) for _ in range(rng.randint(3, 14))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice((".", "?", "!", ":", ","))
        if i % 5 == 0:
            line = f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = {rng.randint(0, 198)}. " + line
        if i % 7 == 0:
            line = f"<think>{line}</think> <answer>{rng.randint(0, 999)}</answer>"
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return it serialised."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # The normalizer and pre-tokenizer are Qwen2's, because transformers' AutoTokenizer rebuilds
    # them that way for a qwen2 folder whatever tokenizer.json says (FACTS.md); with the same
    # pipeline, unsloth's AutoTokenizer-loaded tokenizer encodes exactly like ours.
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return str(tokenizer.to_str())


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """Wrap the trained tokenizer with its special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
    )


def _config(arch: str, size: str, vocab_size: int, ids: dict[str, int]) -> Any:
    """Return the transformers config object for one architecture and size."""
    import transformers

    dims = dict(SIZES[size])
    common: dict[str, Any] = {
        **dims,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "dtype": "bfloat16",
    }
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=True)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, tie_word_embeddings=True)
    if arch == "gemma2":
        return transformers.Gemma2Config(
            **common,
            tie_word_embeddings=True,
            query_pre_attn_scalar=dims["head_dim"],
            sliding_window=512,
        )
    raise AssertionError(arch)  # build() validated arch


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars for the duration (they clutter captured test output)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _check_args(arch: str, size: str, seed: int) -> None:
    """Reject an unknown architecture or size with the supported values."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown tiny model architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; supported: {', '.join(SIZES)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"tiny model seed must be an int, got {seed!r}")


def build(
    arch: str = "llama",
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    size: str = "small",
) -> pathlib.Path:
    """Build (or reuse from cache_dir) a tiny random causal LM folder: config, safetensors weights, a locally trained fast tokenizer with pad/bos/eos and a chat_template. Deterministic for a seed."""  # noqa: E501
    _check_args(arch, size, seed)
    root = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / f"tiny-{arch}-{size}-seed{seed}-v{FORMAT_VERSION}"
    if (target / MARKER_FILE).is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    ids = {
        "pad": int(tokenizer.pad_token_id),
        "bos": int(tokenizer.bos_token_id),
        "eos": int(tokenizer.eos_token_id),
    }
    # Round up to a multiple of 64 as real vocabularies are, which GPU kernels prefer.
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = _config(arch, size, vocab_size, ids)

    # Built in a private folder and renamed into place, so parallel builders (xdist workers
    # sharing a cache) never see a half-written model.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _write_model(staging, config, tokenizer, seed)
        (staging / MARKER_FILE).write_text(
            json.dumps(
                {"arch": arch, "size": size, "seed": seed, "format_version": FORMAT_VERSION},
                sort_keys=True,
            )
            + "\n",
            encoding="utf-8",
        )
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its folder is identical to ours.
            if not (target / MARKER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_model(folder: pathlib.Path, config: Any, tokenizer: Any, seed: int) -> None:
    """Initialise the model from ``seed`` in bfloat16 and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.bfloat16
        )
    finally:
        # A fixture building a model must not reseed the user's test.
        torch.random.set_rng_state(generator_state)
    with quiet_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def is_tiny_model(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a folder written by :func:`build`."""
    return (pathlib.Path(path) / MARKER_FILE).is_file()


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved in a tiny model folder (AutoTokenizer ignores it for qwen2)."""
    from transformers import PreTrainedTokenizerFast

    folder = pathlib.Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {str(folder)!r}; build the folder with "
            "pytest_unsloth.models.tiny.build()"
        )
    tokenizer: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return tokenizer
