"""Picks the attention backend class for a device, dtype and block size.

"auto" prefers flash-attn, then our Triton kernel, then plain PyTorch; an explicit name that
cannot run here is an error rather than a silent fallback. "triton" also runs on CPU under
TRITON_INTERPRET=1 (slow: for testing the kernel), never chosen by "auto" there.
"""

from __future__ import annotations

import torch

from attention import flash_attn_backend, triton_decode
from attention.backend import AttentionBackend
from attention.flash_attn_backend import FlashAttention
from attention.torch_backend import TorchAttention
from attention.triton_backend import TritonAttention

BACKEND_NAMES = ("auto", "torch", "triton", "flash_attn")


class AttentionBackendError(ValueError):
    pass


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype, block_size: int
) -> type[AttentionBackend]:
    device = torch.device(device)
    if name == "auto":
        return _auto(device, dtype, block_size)
    if name == "torch":
        return TorchAttention
    if name == "triton":
        if not _triton_usable(device):
            raise AttentionBackendError(
                "triton backend needs the triton package and a CUDA device, or on CPU "
                "TRITON_INTERPRET=1 set before the process starts (device "
                f"{device}, triton installed: {triton_decode.TRITON_AVAILABLE}, interpreter on: "
                f"{triton_decode.INTERPRETED})"
            )
        return TritonAttention
    if name == "flash_attn":
        if not flash_attn_backend.supports(block_size, dtype, device):
            raise AttentionBackendError(
                "flash_attn backend needs the flash-attn package, a CUDA device, fp16 or bf16 and "
                f"block_size a multiple of {flash_attn_backend.PAGED_BLOCK_MULTIPLE} (device "
                f"{device}, dtype {dtype}, block_size {block_size}, flash-attn installed: "
                f"{flash_attn_backend.FLASH_ATTN_AVAILABLE})"
            )
        return FlashAttention
    raise AttentionBackendError(
        f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
    )


def _auto(device: torch.device, dtype: torch.dtype, block_size: int) -> type[AttentionBackend]:
    if device.type != "cuda":
        return TorchAttention
    if flash_attn_backend.supports(block_size, dtype, device):
        return FlashAttention
    if _triton_usable(device):
        return TritonAttention
    return TorchAttention


def _triton_usable(device: torch.device) -> bool:
    if not triton_decode.TRITON_AVAILABLE:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and triton_decode.INTERPRETED
