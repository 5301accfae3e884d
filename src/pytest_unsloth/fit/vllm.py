"""Colocated vLLM (unsloth ``fast_inference=True``, TRL ``use_vllm`` colocate): what it reserves.

vLLM cannot travel to the test GPU (too large to carry), so this follows the two sources of truth
instead of a measurement:

- unsloth_zoo ``vllm_utils.approximate_vllm_memory_usage`` (2026.10.9): vLLM is given
  ``gpu_memory_utilization x free memory``; out of it come the weights, LoRA slots
  (``max_lora_rank`` x all q/k/v/o and MLP, fp16), a CUDA-graph allowance
  (172 graphs x hidden x layers x 4 bytes, clamped to 0.15..1.0 GiB), and 95 % of the rest is KV
  cache; ``_fit_max_seq_length_to_kv_cache`` then lowers ``max_seq_length`` to the KV tokens.
- vLLM ``v1/kv_cache_interface.py``: a full-attention layer's page is
  ``2 x block_size x num_kv_heads x head_size x dtype bytes`` and one sequence of
  ``max_model_len`` needs ``cdiv(max_model_len, block_size)`` pages per layer
  (``check_enough_kv_cache_memory`` refuses to start otherwise).

Sliding-window layers are counted as full attention (an upper bound on KV per token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytest_unsloth.util.units import GIB

if TYPE_CHECKING:
    from pytest_unsloth.fit.arch import Arch

BLOCK_SIZE = 16  # vLLM's default cache block (tokens)
KV_DTYPE_BYTES = 2  # bf16/fp16 KV cache; unsloth counts float8 as 1.25


@dataclasses.dataclass(frozen=True)
class VllmBudget:
    """What colocated vLLM takes and the longest sequence its KV cache holds."""

    requested_bytes: int  # gpu_memory_utilization x memory
    weights_bytes: int
    lora_bytes: int
    cuda_graph_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    needed_tokens: int  # longest prompt + completion
    one_sequence_bytes: int  # vLLM: cdiv(len, block) pages per layer
    reserved_bytes: int  # beyond the weights, which training shares with vLLM under unsloth
    notes: tuple[str, ...] = ()

    @property
    def fits_one_sequence(self) -> bool:
        """Whether the KV cache holds one full-length sequence (vLLM refuses to start if not)."""
        return self.kv_cache_bytes >= self.one_sequence_bytes


def kv_bytes_per_token(arch: Arch, dtype_bytes: float = KV_DTYPE_BYTES) -> int:
    """2 (K and V) x layers x KV heads x head dim x dtype bytes."""
    return int(2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes)


def cuda_graph_bytes(arch: Arch) -> int:
    """unsloth_zoo's allowance: 172 graphs x hidden x layers x 4 bytes, within 0.15..1.0 GiB."""
    return min(max(172 * arch.hidden * arch.layers * 4, int(0.15 * GIB)), int(1.0 * GIB))


def lora_slot_bytes(arch: Arch, rank: int) -> int:
    """unsloth_zoo's LoRA slot count for vLLM: all q/k/v/o and MLP, fp16, one adapter."""
    h, q, kv, m = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    a = rank * (h * 3 + q) + h * rank * 2 + m * rank
    b = rank * (q + 2 * kv + h) + rank * (2 * m) + rank * h
    return (a + b) * arch.layers * 2


def budget(arch: Arch, s: Mapping[str, Any], weights: int) -> VllmBudget:
    """Size the vLLM reservation for these settings (needs gpu_total_memory, else 24 GiB)."""
    notes: list[str] = []
    memory = s.get("gpu_total_memory")
    if not memory:
        memory = 24 * GIB
        notes.append("vLLM sized for a 24 GiB card (pass gpu_total_memory or a fit target)")
    requested = int(float(s["gpu_memory_utilization"]) * int(memory))
    rank = int(s.get("max_lora_rank") or s["lora_r"])
    lora = lora_slot_bytes(arch, rank)
    graphs = cuda_graph_bytes(arch)
    left = max(0, requested - weights - lora - graphs)
    per_token = kv_bytes_per_token(arch)
    kv_tokens = int(0.95 * left / per_token) // 256 * 256 if per_token else 0
    if s["task"] == "grpo":
        needed = int(s["max_prompt_length"]) + int(s["max_completion_length"])
    else:
        needed = int(s["max_seq_length"])
    one_seq = math.ceil(needed / BLOCK_SIZE) * BLOCK_SIZE * per_token
    if kv_tokens < needed:
        notes.append(
            f"vLLM's KV cache holds about {kv_tokens} tokens, less than one sequence of {needed}: "
            "unsloth lowers max_seq_length to it and vLLM rejects longer prompts"
        )
    return VllmBudget(
        requested_bytes=requested,
        weights_bytes=weights,
        lora_bytes=lora,
        cuda_graph_bytes=graphs,
        kv_cache_bytes=int(0.95 * left),
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        needed_tokens=needed,
        one_sequence_bytes=one_seq,
        reserved_bytes=max(0, requested - weights),
        notes=tuple(notes),
    )
