"""Operator times as rooflines with efficiencies fitted to GPU measurements (server/simulate/
calibration.py fits them to Vidur's per-operator timings; server/simulate/fits/ holds the result).

Every formula is plain arithmetic, so the same function evaluates one operator (floats) or a
whole calibration table (numpy arrays). Times in milliseconds, sizes in elements or bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.simulate.hardware import ModelShape

FITS_DIR = Path(__file__).parent / "fits"
TILE = 64  # output tile of a GEMM kernel: partly filled waves of tiles cost a full wave


def _ceil_div(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class GemmFit:
    """t = ((F / (P * compute)) ** q + (bytes / (BW * memory)) ** q) ** (1 / q) + overhead,
    with F the FLOPs of the tiles actually launched (whole waves of TILE x TILE tiles)."""

    compute_efficiency: float
    memory_efficiency: float
    sharpness: float  # q: large is a sharp roofline, 1 adds the two times
    overhead_ms: float

    def ms(self, m, k, n, peak_flops: float, bandwidth: float, num_sms: int, dtype_bytes=2):
        tiles = _ceil_div(m, TILE) * _ceil_div(n, TILE)
        launched = 2.0 * k * _ceil_div(tiles, num_sms) * num_sms * TILE * TILE
        moved = dtype_bytes * (k * n + m * k + m * n)
        compute = launched / (peak_flops * self.compute_efficiency) * 1e3
        memory = moved / (bandwidth * self.memory_efficiency) * 1e3
        q = self.sharpness
        return (compute**q + memory**q) ** (1.0 / q) + self.overhead_ms


@dataclass(frozen=True)
class ElementwiseFit:
    """t = overhead + bytes / (BW * efficiency): norms, rotary embedding, activation, adds."""

    efficiency: float
    overhead_ms: float

    def ms(self, moved_bytes, bandwidth: float):
        return self.overhead_ms + moved_bytes / (bandwidth * self.efficiency) * 1e3


@dataclass(frozen=True)
class DecodeAttentionFit:
    """Paged decode attention over `kv_tokens` cached tokens of `rows` requests:
    t = overhead + per_row * rows + bytes / (BW * efficiency * kv / (kv + half_tokens))."""

    efficiency: float
    overhead_ms: float
    per_row_ms: float
    half_tokens: float  # KV tokens at which the kernel reaches half its bandwidth

    def ms(self, rows, kv_tokens, kv_width: int, bandwidth: float, dtype_bytes=2):
        moved = kv_tokens * (2 * kv_width * dtype_bytes)  # exact integers: either order
        saturation = kv_tokens / (kv_tokens + self.half_tokens)
        return (
            self.overhead_ms
            + self.per_row_ms * rows
            + moved / (bandwidth * self.efficiency * saturation) * 1e3
        )

    def ms_each(self, rows: int, kv_tokens: range, kv_width: int, bandwidth: float,
                dtype_bytes=2) -> list[float]:  # fmt: skip
        """`ms` at each of `kv_tokens`, the same floats (the same operations in the same
        order) in a list: for a few dozen decode steps, arrays cost more than they save."""
        base = self.overhead_ms + self.per_row_ms * rows
        per_token, speed, half = (
            2 * kv_width * dtype_bytes,
            bandwidth * self.efficiency,
            self.half_tokens,
        )
        return [base + kv * per_token / (speed * (kv / (kv + half))) * 1e3 for kv in kv_tokens]


@dataclass(frozen=True)
class PrefillAttentionFit:
    """Causal attention of a `chunk` of new tokens after `context` cached ones:
    t = overhead + per_token * chunk + F / (P * efficiency * n / (n + half_tokens))."""

    efficiency: float
    overhead_ms: float
    per_token_ms: float
    half_tokens: float

    def ms(self, chunk, context, q_width: int, peak_flops: float):
        flops = 4.0 * chunk * (context + chunk / 2) * q_width
        span = context + chunk
        saturation = span / (span + self.half_tokens)
        return (
            self.overhead_ms
            + self.per_token_ms * chunk
            + flops / (peak_flops * self.efficiency * saturation) * 1e3
        )


@dataclass(frozen=True)
class LinkFit:
    """Point-to-point send/recv between two GPUs: t = latency + bytes / bandwidth."""

    latency_ms: float
    bandwidth: float  # bytes/s

    def ms(self, nbytes):
        return self.latency_ms + nbytes / self.bandwidth * 1e3


ELEMENTWISE_OPS = (
    "input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add", "emb"
)  # fmt: skip


def elementwise_bytes(shape: ModelShape, op: str, tokens, tp=1):
    """Bytes one GPU moves for an elementwise op over `tokens` (reads and writes)."""
    widths = {
        "input_layernorm": 2 * shape.hidden,
        "post_attention_layernorm": 2 * shape.hidden,
        "attn_rope": 2 * (shape.q_width + shape.kv_width) // tp,
        "mlp_act": 3 * shape.ffn // tp,  # gate and up in, their product out
        "add": 3 * shape.hidden,
        "emb": 2 * shape.hidden,
    }
    return tokens * widths[op] * shape.dtype_bytes


@dataclass(frozen=True)
class DeviceFit:
    """One GPU model's fitted efficiencies, and where they came from."""

    gemm: GemmFit
    elementwise: dict[str, ElementwiseFit]
    decode_attention: DecodeAttentionFit
    prefill_attention: PrefillAttentionFit
    link: LinkFit
    source: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        def plain(obj) -> dict:
            return {f.name: getattr(obj, f.name) for f in fields(obj)}

        return {
            "source": self.source,
            "gemm": plain(self.gemm),
            "elementwise": {op: plain(fit) for op, fit in self.elementwise.items()},
            "decode_attention": plain(self.decode_attention),
            "prefill_attention": plain(self.prefill_attention),
            "link": plain(self.link),
        }

    @classmethod
    def from_json(cls, data: dict) -> DeviceFit:
        return cls(
            gemm=GemmFit(**data["gemm"]),
            elementwise={op: ElementwiseFit(**f) for op, f in data["elementwise"].items()},
            decode_attention=DecodeAttentionFit(**data["decode_attention"]),
            prefill_attention=PrefillAttentionFit(**data["prefill_attention"]),
            link=LinkFit(**data["link"]),
            source=data.get("source", {}),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_fit(name: str) -> DeviceFit:
    return DeviceFit.from_json(json.loads((FITS_DIR / f"{name}.json").read_text()))
