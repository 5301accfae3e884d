"""Length budget: does every prompt (after the chat template) plus the completion budget fit?

TRL 1.x removed ``max_prompt_length`` and no longer truncates prompts, so the budget that matters
is the longest templated prompt plus ``max_completion_length`` against the model's
``max_seq_length`` (and ``vllm_max_model_length`` when vLLM generates).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_unsloth.findings import Finding
from pytest_unsloth.grpo.problems import ReportText, errors, installed_version

__all__ = ["BudgetReport", "check_length_budget", "prompt_of"]

_CHUNK = 1024


@dataclasses.dataclass(frozen=True, repr=False)
class BudgetReport(ReportText):
    """Prompt token lengths against the length limit."""

    count: int
    p50: int
    p95: int
    max: int
    limit: int
    limit_name: str
    max_completion_length: int
    overflow: tuple[tuple[int, int], ...]
    problems: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Whether no error was found."""
        return not errors(self.problems)

    def summary(self) -> str:
        """One line: the length distribution against the limit."""
        return (
            f"{self.count} prompts: p50 {self.p50}, p95 {self.p95}, max {self.max} tokens + "
            f"{self.max_completion_length} completion <= {self.limit} ({self.limit_name}): "
            f"{len(self.overflow)} over"
        )


def prompt_of(row: Any) -> Any:
    """Return what GRPO generates from: 'prompt', or the prompt part of a chat/instruction row."""
    if isinstance(row, str):
        return row
    if isinstance(row, list):
        return row
    if not isinstance(row, Mapping):
        raise TypeError(f"a dataset row must be a dict, a string or a message list, got {row!r}")
    if "prompt" in row:
        return row["prompt"]
    for key in ("messages", "conversations"):
        if key in row and isinstance(row[key], list):
            messages = list(row[key])
            # The trailing assistant turns are the answer GRPO generates, not part of the prompt.
            while (
                messages
                and isinstance(messages[-1], Mapping)
                and messages[-1].get("role") == "assistant"
            ):
                messages.pop()
            return messages
    if "instruction" in row:
        text = str(row["instruction"])
        extra = row.get("input")
        if extra:
            text += "\n\n" + str(extra)
        return [{"role": "user", "content": text}]
    raise KeyError(
        f"row has none of the fields prompt, messages, instruction (fields: {', '.join(row)})"
    )


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def _config_get(config: Any, key: str) -> Any:
    """Read a key from a dict-like config or an attribute from a GRPOConfig."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _default_completion_length() -> int:
    """Read max_completion_length's default from the installed GRPOConfig."""
    from trl import GRPOConfig  # type: ignore[attr-defined]

    field = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "max_completion_length")
    return int(field.default)  # type: ignore[arg-type]


def _trl_lengths(tokenizer: Any, prompts: list[Any], conversational: bool) -> list[int]:
    """Tokenize prompts in batches exactly as TRL's GRPOTrainer._tokenize_prompts does."""
    lengths: list[int] = []
    for start in range(0, len(prompts), _CHUNK):
        chunk = prompts[start : start + _CHUNK]
        if conversational:
            encoded = tokenizer.apply_chat_template(
                conversation=chunk,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
        else:
            encoded = tokenizer(text=chunk)
        lengths += [len(ids) for ids in encoded["input_ids"]]
    return lengths


def _fast_lengths(tokenizer: Any, prompts: list[Any], conversational: bool) -> list[int] | None:
    """Render, then count with the Rust tokenizer directly (no offsets, no Python encodings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is None:
        return None
    if conversational:
        texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    else:
        texts = prompts
    # apply_chat_template(tokenize=True) adds no special tokens to the rendered text; a plain
    # tokenizer(text=...) call does.
    return [len(e.ids) for e in encode(list(texts), add_special_tokens=not conversational)]


_SAMPLE = 32


def _token_lengths(tokenizer: Any, prompts: list[Any], conversational: bool) -> list[int]:
    """TRL's token count per prompt; the fast path only where it matches TRL's call on a sample."""
    if len(prompts) > _SAMPLE:
        with contextlib.suppress(Exception):  # any surprise in the fast path: use TRL's call
            sample = _trl_lengths(tokenizer, prompts[:_SAMPLE], conversational)
            if _fast_lengths(tokenizer, prompts[:_SAMPLE], conversational) == sample:
                fast = _fast_lengths(tokenizer, prompts[_SAMPLE:], conversational)
                if fast is not None:
                    return sample + fast
    return _trl_lengths(tokenizer, prompts, conversational)


_MEDIA = ("image", "image_url", "video", "audio")


def _media_parts(prompt: Any) -> int:
    """How many image/video/audio content parts the messages of one prompt carry."""
    if not isinstance(prompt, list):
        return 0
    count = 0
    for message in prompt:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            count += sum(
                1 for part in content if isinstance(part, Mapping) and part.get("type") in _MEDIA
            )
    return count


def _text_only(prompt: list[Any]) -> list[Any]:
    """The prompt with each content-part list reduced to its text parts, joined."""
    out = []
    for message in prompt:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            text = "".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text"
            )
            message = {**message, "content": text}
        out.append(message)
    return out


def _first_failure(
    tokenizer: Any, prompts: list[Any], rows: list[int], conversational: bool
) -> tuple[int, BaseException] | None:
    """The first row (of the first few hundred) whose prompt alone fails to tokenize."""
    for row in rows[:300]:
        try:
            _trl_lengths(tokenizer, [prompts[row]], conversational)
        except Exception as exc:
            return row, exc
    return None


def _media_note(count: int, name: str) -> Finding:
    """Info: the template rendered the image placeholders, but not the image tokens."""
    return Finding(
        found=f"{count} prompts carry image/video content parts; the chat "
        f"template of {name} rendered their placeholders, but the processor's "
        "expansion of each image into its image tokens is NOT counted",
        why="a vision model's processor replaces each image placeholder with many "
        "tokens (often hundreds per image), so these prompts are longer than measured",
        fix="leave room for the image tokens in max_seq_length",
        code="media-parts",
        severity="info",
    )


def _text_parts_only(count: int, parts: int, name: str, error: BaseException) -> Finding:
    """Warning: the template cannot render the media parts; only the text was measured."""
    return Finding(
        found=f"{count} prompts carry {parts} image/video content parts, which "
        f"the chat template of {name} cannot render ({type(error).__name__}: "
        f"{str(error)[:100]}); measured their text parts only, image tokens NOT "
        "counted",
        why="a vision model's processor renders those parts and inserts its own image "
        "tokens (often hundreds per image), so these prompts are longer than measured; "
        "with this text-only tokenizer TRL's first step fails the same way",
        fix="point unsloth_tokenizer at the vision model's processor folder (its chat "
        "template renders image parts), and leave room for the image tokens",
        code="media-parts",
        severity="warning",
    )


def _template_error(
    tokenizer: Any, prompts: list[Any], rows: list[int], conversational: bool, error: BaseException
) -> Finding:
    """Error: the template or tokenizer raised; named with the first row that fails alone."""
    failure = _first_failure(tokenizer, prompts, rows, conversational)
    row, culprit = failure if failure is not None else (rows[0], error)
    how = "the chat template" if conversational else "the tokenizer"
    return Finding(
        found=f"{how} of {type(tokenizer).__name__} raised {type(culprit).__name__}: "
        f"{str(culprit)[:200]} on row {row} = {prompts[row]!r:.80}",
        why=f"TRL tokenizes every prompt with {how} at its first step, so training fails the "
        "same way; no length could be measured for these prompts",
        fix="make the prompts match the template's format ({'role', 'content': str} messages), "
        "or use the tokenizer whose chat template renders them",
        code="template-error",
    )


def _measure(
    tokenizer: Any,
    prompts: list[Any],
    rows: list[int],
    conversational: bool,
    problems: list[Finding],
) -> list[int] | None:
    """Token lengths of ``rows``; a template or tokenizer error becomes a problem, never raised."""
    batch = [prompts[i] for i in rows]
    name = type(tokenizer).__name__
    media = [i for i in rows if _media_parts(prompts[i])]
    try:
        lengths = _token_lengths(tokenizer, batch, conversational)
    except Exception as exc:
        error: BaseException = exc
    else:
        if media:
            problems.append(_media_note(len(media), name))
        return lengths
    if conversational and media:
        # A text-only chat template cannot render content-part lists ({"type": "image"}); the
        # processor of a vision model renders them and adds its image tokens.
        try:
            lengths = _token_lengths(tokenizer, [_text_only(p) for p in batch], True)
        except Exception as exc:
            error = exc
        else:
            parts = sum(_media_parts(prompts[i]) for i in media)
            problems.append(_text_parts_only(len(media), parts, name, error))
            return lengths
    problems.append(_template_error(tokenizer, prompts, rows, conversational, error))
    return None


@dataclasses.dataclass(frozen=True)
class _Limits:
    """The sequence limit a prompt plus its completion must fit, and where it comes from."""

    limit: int
    limit_name: str
    max_completion_length: int

    def report(
        self,
        count: int,
        problems: list[Finding],
        ordered: list[int] | None = None,
        overflow: tuple[tuple[int, int], ...] = (),
    ) -> BudgetReport:
        """The report for ``count`` prompts whose sorted lengths are ``ordered`` (if measured)."""
        p50, p95, longest = (
            (_percentile(ordered, 50), _percentile(ordered, 95), ordered[-1])
            if ordered
            else (0, 0, 0)
        )
        return BudgetReport(
            count,
            p50,
            p95,
            longest,
            self.limit,
            self.limit_name,
            self.max_completion_length,
            overflow,
            tuple(problems),
        )


def check_length_budget(
    tokenizer: Any,
    dataset: Iterable[Any],
    *,
    max_seq_length: int,
    max_completion_length: int | None = None,
    vllm_max_model_length: int | None = None,
    config: Any = None,
) -> BudgetReport:
    """Measure every templated prompt; report rows whose prompt + completion budget overflows.

    Never raises: a template, tokenizer, dataset or config error is a problem of the report.
    """
    try:
        problems = _config_problems(config)
        limits = _resolve_limits(
            config, max_seq_length, max_completion_length, vllm_max_model_length
        )
        prompts = _read_prompts(dataset, problems)
        if not prompts:
            return limits.report(0, problems)
        chats, texts = _usable_prompts(tokenizer, prompts, problems)
        if not chats and not texts:
            return limits.report(len(prompts), problems)
        if not getattr(tokenizer, "is_fast", True):
            problems.append(_slow_tokenizer(tokenizer))
        measured = _measure_kinds(tokenizer, prompts, chats, texts, problems)
        if not measured:
            return limits.report(len(prompts), problems)
        return _judge(measured, limits, problems)
    except Exception as exc:
        return _measure_failed(exc, max_seq_length, max_completion_length)


def _measure_failed(
    exc: Exception, max_seq_length: object, max_completion_length: object
) -> BudgetReport:
    """The report when measuring raised: one error saying what failed."""
    limit = max_seq_length if isinstance(max_seq_length, int) else 0
    completion = max_completion_length if isinstance(max_completion_length, int) else 0
    problem = Finding(
        found=f"measuring the prompts failed: {type(exc).__name__}: {str(exc)[:300]}",
        why="GRPOTrainer reads and tokenizes the same prompts with the same tokenizer and "
        "settings at its first step",
        fix="check the arguments (max_seq_length, max_completion_length, the config), the "
        "dataset rows and the tokenizer",
        code="measure-failed",
    )
    return BudgetReport(0, 0, 0, 0, limit, "max_seq_length", completion, (), (problem,))


def _config_problems(config: Any) -> list[Finding]:
    """A warning when the config sets max_prompt_length, which TRL 1.x no longer has."""
    if _config_get(config, "max_prompt_length") is None and not (
        isinstance(config, Mapping) and "max_prompt_length" in config
    ):
        return []
    trl_version = installed_version("trl")
    return [
        Finding(
            found="the config sets max_prompt_length = "
            f"{_config_get(config, 'max_prompt_length')!r}",
            why=f"TRL {trl_version or '1.x'} GRPOConfig has no max_prompt_length (TypeError) "
            "and never truncates prompts, so the longest prompt counts in full",
            fix="remove max_prompt_length; filter or shorten long prompts in the dataset instead",
            code="max-prompt-length",
            severity="warning",
        )
    ]


def _resolve_limits(
    config: Any,
    max_seq_length: int,
    max_completion_length: int | None,
    vllm_max_model_length: int | None,
) -> _Limits:
    """The arguments, else the config, else GRPOConfig's default; the smaller limit wins."""
    if max_completion_length is None:
        value = _config_get(config, "max_completion_length")
        max_completion_length = int(value) if value is not None else _default_completion_length()
    if vllm_max_model_length is None:
        value = _config_get(config, "vllm_max_model_length")
        if value is not None and _config_get(config, "use_vllm"):
            vllm_max_model_length = int(value)
    if vllm_max_model_length is not None and vllm_max_model_length < max_seq_length:
        return _Limits(vllm_max_model_length, "vllm_max_model_length", max_completion_length)
    return _Limits(max_seq_length, "max_seq_length", max_completion_length)


def _read_prompts(dataset: Iterable[Any], problems: list[Finding]) -> list[Any]:
    """Each row's prompt, up to the first row that has none (reported)."""
    prompts: list[Any] = []
    for index, row in enumerate(dataset):
        try:
            prompts.append(prompt_of(row))
        except (KeyError, TypeError) as exc:
            problems.append(
                Finding(
                    found=f"row {index}: {exc}",
                    why="GRPOTrainer generates from each row's 'prompt'",
                    fix="map the rows to {'prompt': [messages] or str, ...}",
                    code="no-prompt",
                )
            )
            break
    return prompts


def _usable_prompts(
    tokenizer: Any, prompts: list[Any], problems: list[Finding]
) -> tuple[list[int], list[int]]:
    """Rows of conversational and of plain prompts that can be measured; the rest reported."""
    chats = [i for i, p in enumerate(prompts) if isinstance(p, list)]
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    odd = [i for i, p in enumerate(prompts) if not isinstance(p, list | str)]
    if odd:
        problems.append(
            Finding(
                found=f"{len(odd)} prompts are neither text nor a message list, first: row "
                f"{odd[0]} = {prompts[odd[0]]!r:.60}",
                why="GRPOTrainer cannot tokenize them",
                fix="make every prompt a string or a list of {'role', 'content'} messages",
                code="bad-prompt",
            )
        )
    if chats and texts:
        problems.append(_mixed_prompts(chats, texts))
    if chats and not getattr(tokenizer, "chat_template", None):
        problems.append(
            Finding(
                found=f"the tokenizer ({type(tokenizer).__name__}) has no chat_template, but the "
                "prompts are conversational",
                why="TRL renders conversational prompts with apply_chat_template, which raises "
                "without a template",
                fix="use the instruct model's tokenizer or set tokenizer.chat_template",
                code="no-chat-template",
            )
        )
        chats = []
    return chats, texts


def _mixed_prompts(chats: list[int], texts: list[int]) -> Finding:
    """Error: conversational and plain prompts in one dataset."""
    first, other = (chats, texts) if chats[0] < texts[0] else (texts, chats)
    kinds = ("conversational", "plain") if first is chats else ("plain", "conversational")
    return Finding(
        found=f"row {first[0]} is {kinds[0]} but {len(other)} rows are {kinds[1]}, first: "
        f"row {other[0]}",
        why="TRL picks the chat template or plain tokenization from the first prompt of "
        "each batch, so a batch mixing both fails or is tokenized wrongly",
        fix="make every prompt the same kind (all message lists, or all strings)",
        code="mixed-prompts",
    )


def _slow_tokenizer(tokenizer: Any) -> Finding:
    """Info: a Python tokenizer makes measuring and training slow."""
    return Finding(
        found=f"{type(tokenizer).__name__} is a slow (Python) tokenizer",
        why="measuring and training tokenize far slower",
        fix="load the fast tokenizer (use_fast=True, tokenizer.json)",
        code="slow-tokenizer",
        severity="info",
    )


def _measure_kinds(
    tokenizer: Any,
    prompts: list[Any],
    chats: list[int],
    texts: list[int],
    problems: list[Finding],
) -> dict[int, int]:
    """Token length by row, conversational and plain prompts measured apart."""
    measured: dict[int, int] = {}
    for rows_of_kind, conversational in ((chats, True), (texts, False)):
        if rows_of_kind:
            found = _measure(tokenizer, prompts, rows_of_kind, conversational, problems)
            if found is not None:
                measured.update(zip(rows_of_kind, found, strict=True))
    return measured


def _judge(measured: dict[int, int], limits: _Limits, problems: list[Finding]) -> BudgetReport:
    """Compare the measured lengths with the limit; report the rows that overflow it."""
    limit, limit_name, completion = limits.limit, limits.limit_name, limits.max_completion_length
    order = sorted(measured)
    ordered = sorted(measured[i] for i in order)
    budget = limit - completion
    overflow = tuple((i, measured[i]) for i in order if measured[i] > budget)
    if completion >= limit:
        problems.append(
            Finding(
                found=f"max_completion_length {completion} >= {limit_name} {limit}",
                why="no prompt leaves room for a full completion",
                fix=f"lower max_completion_length below {limit} or raise {limit_name}",
                code="completion-too-long",
            )
        )
    elif overflow:
        problems.append(_overflow(overflow, ordered, limits))
    return limits.report(len(ordered), problems, ordered, overflow)


def _overflow(
    overflow: tuple[tuple[int, int], ...], ordered: list[int], limits: _Limits
) -> Finding:
    """Error: these rows plus a full completion do not fit the limit."""
    limit, limit_name, completion = limits.limit, limits.limit_name, limits.max_completion_length
    worst = ", ".join(f"row {i} ({n} tokens)" for i, n in overflow[:10])
    more = f" and {len(overflow) - 10} more" if len(overflow) > 10 else ""
    return Finding(
        found=f"{len(overflow)} of {len(ordered)} prompts are longer than {limit - completion} "
        f"tokens ({limit_name} {limit} - max_completion_length {completion}): "
        f"{worst}{more}; p50 {_percentile(ordered, 50)}, p95 "
        f"{_percentile(ordered, 95)}, max {ordered[-1]}",
        why="TRL does not truncate prompts (max_prompt_length is gone), so these rows plus "
        f"a full completion run past {limit_name}: generation is cut short or fails",
        fix="drop or shorten those rows, "
        + (
            f"lower max_completion_length to {limit - ordered[-1]}, "
            if limit - ordered[-1] >= 16
            else ""
        )
        + f"or raise {limit_name} to {ordered[-1] + completion}",
        code="overflow",
    )
