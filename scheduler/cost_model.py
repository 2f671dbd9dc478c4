"""The load-aware policy's cost model: decode step time, executor attention time and prefill time
as functions of load, fitted by least squares from a device profile (`adrenaline profile`), and
corrected online by the ratio of measured to predicted times while serving.

Plain data and arithmetic; the only I/O is reading and writing a profile's JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

PROFILE_VERSION = 1
CORRECTION_WEIGHT = 0.2  # EWMA weight of the newest measured/predicted ratio
BUILTIN_PROFILE = Path(__file__).parent / "profiles" / "cpu_default.json"
RATIO_LIMITS = (0.1, 10.0)  # one odd sample (a GC pause, a cold cache) moves the ratio at most this


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class CostModel:
    """Times in milliseconds (a fitted intercept may be negative; predictions never are).

    decode step   = a + b * batch + c * local context tokens   (one step of a decode worker)
    decode layer  = decode step / num_layers                    (the window attention overlaps)
    attention     = e0 + e1 * offloaded tokens + e2 * batch     (one layer, on the executor)
    prefill       = p0 + p1 * prompt tokens + p2 * prompt tokens^2   (one prefill step)
    offloaded step = o0 + o1 * batch   (a decode step whose rows are all offloaded)
    exchange      = x0 + x1 * offloaded rows   (one layer, one executor, on the decode worker)

    A prefill's attention grows with the square of the prompt, and a short prompt's step is
    mostly fixed cost: a line fitted over 64 to 2048 tokens put a 4-token prefill at a tenth of
    its measured time. p2 may be left out (a profile of two coefficients: p2 = 0).

    Both are the decode worker's own time, its executors' attention and its waits on them
    aside. A step with local rows costs the decode step plus the exchange per layer: posting
    q/k/v, collecting the output, the step plan. One without skips local attention, whose fixed
    cost per layer the decode intercept holds. A profile of a GPU, or one taken before these
    were measured, holds zeros: such a step is then costed as a decode step.
    """

    num_layers: int
    decode: tuple[float, float, float]
    attention: tuple[float, float, float]
    prefill: tuple[float, ...]  # (p0, p1) or (p0, p1, p2)
    offloaded: tuple[float, float] = (0.0, 0.0)
    exchange: tuple[float, float] = (0.0, 0.0)
    model: str = ""
    device: str = ""

    def decode_step_ms(self, batch: int, context_tokens: int) -> float:
        a, b, c = self.decode
        return max(0.0, a + b * batch + c * context_tokens)

    def decode_layer_ms(self, batch: int, context_tokens: int) -> float:
        return self.decode_step_ms(batch, context_tokens) / self.num_layers

    def attention_layer_ms(self, offloaded_tokens: int, batch: int) -> float:
        if batch == 0:
            return 0.0
        e0, e1, e2 = self.attention
        return max(0.0, e0 + e1 * offloaded_tokens + e2 * batch)

    def offloaded_step_ms(self, batch: int) -> float:
        """A decode step of `batch` rows, all offloaded (the decode step's, unmeasured)."""
        if self.offloaded == (0.0, 0.0):
            return self.decode_step_ms(batch, 0)
        o0, o1 = self.offloaded
        return max(0.0, o0 + o1 * batch)

    def exchange_layer_ms(self, offloaded_rows: int) -> float:
        if offloaded_rows == 0:
            return 0.0
        x0, x1 = self.exchange
        return max(0.0, x0 + x1 * offloaded_rows)

    def prefill_ms(self, tokens: int) -> float:
        """One prompt of `tokens`, whole."""
        return self.prefill_chunks_ms([(tokens, 0)])

    def prefill_chunks_ms(self, chunks: list[tuple[int, int]]) -> float:
        """One step of prompt chunks, (tokens, tokens already computed before them) each. The
        square term is causal attention, per prompt: a chunk of c after ctx costs what
        c * ctx + c^2 / 2 query-key pairs do, as the whole prompts profiled (c^2 / 2) did."""
        p0, p1, p2 = (*self.prefill, 0.0)[:3]
        tokens = sum(c for c, _ in chunks)
        pairs = sum(c * c + 2 * c * ctx for c, ctx in chunks)
        return max(0.0, p0 + p1 * tokens + p2 * pairs)

    # Profiles ---------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"version": PROFILE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        if not isinstance(data, dict):
            raise ProfileError(f"a profile is a JSON object, not {type(data).__name__}")
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(f"profile version {data.get('version')!r}, need {PROFILE_VERSION}")
        try:
            return cls(
                num_layers=int(data["num_layers"]),
                decode=_floats(data["decode"], 3),
                attention=_floats(data["attention"], 3),
                prefill=_floats(data["prefill"], 2, 3),
                offloaded=_floats(data.get("offloaded", (0.0, 0.0)), 2),
                exchange=_floats(data.get("exchange", (0.0, 0.0)), 2),
                model=str(data.get("model", "")),
                device=str(data.get("device", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from exc


def builtin_profile() -> CostModel:
    """The tiny model on this project's CPU machine: a starting point the correction adapts."""
    return CostModel.load(BUILTIN_PROFILE)


def _floats(values, n: int, most: int | None = None) -> tuple:
    if not n <= len(values) <= (most or n):
        wanted = f"{n} to {most}" if most else str(n)
        raise ValueError(f"expected {wanted} coefficients, got {len(values)}")
    return tuple(float(v) for v in values)


# Fitting ----------------------------------------------------------------------------------------


def fit_linear(
    features: list[tuple[float, ...]], targets: list[float], relative: bool = False
) -> tuple[float, ...]:
    """Least squares for target = w0 + sum(w_i * feature_i). A slope that fits below zero is
    dropped and the rest refitted (more load never takes less time). relative: minimise the
    relative error, so that targets spanning orders of magnitude all count."""
    x = np.asarray(features, dtype=np.float64).reshape(len(targets), -1)
    y = np.asarray(targets, dtype=np.float64)
    design = np.hstack([np.ones((len(y), 1)), x])
    if relative:
        if (y <= 0).any():
            raise ProfileError("a relative fit needs positive times")
        design, y = design / y[:, None], np.ones_like(y)
    if len(y) < design.shape[1]:
        raise ProfileError(f"{len(y)} samples cannot fit {design.shape[1]} coefficients")
    keep = np.ones(design.shape[1], dtype=bool)
    while True:
        w = np.zeros(design.shape[1])
        w[keep], *_ = np.linalg.lstsq(design[:, keep], y, rcond=None)
        negative = np.flatnonzero(w[1:] < 0) + 1
        if len(negative) == 0:
            return tuple(round(float(v), 9) for v in w)
        keep[negative[np.argmin(w[negative])]] = False  # the most negative slope goes first


def fit_cost_model(
    num_layers: int,
    decode: list[tuple[int, int, float]],  # (batch, context tokens, step ms)
    attention: list[tuple[int, int, float]],  # (offloaded tokens, batch, layer ms)
    prefill: list[tuple[int, float]],  # (prompt tokens, step ms)
    offloaded: list[tuple[int, float]] = (),  # (batch, step ms), all rows offloaded
    exchange: list[tuple[int, float]] = (),  # (offloaded rows, layer ms)
    model: str = "",
    device: str = "",
) -> CostModel:
    return CostModel(
        num_layers=num_layers,
        decode=fit_linear([(b, c) for b, c, _ in decode], [t for *_, t in decode]),
        attention=fit_linear([(n, b) for n, b, _ in attention], [t for *_, t in attention]),
        prefill=fit_linear(
            [(n, n * n) for n, _ in prefill], [t for _, t in prefill], relative=True
        ),
        offloaded=_fit_rows(offloaded),
        exchange=_fit_rows(exchange),
        model=model,
        device=device,
    )


def _fit_rows(samples: list[tuple[int, float]]) -> tuple[float, float]:
    if not samples:
        return (0.0, 0.0)
    return fit_linear([(n,) for n, _ in samples], [t for _, t in samples])  # type: ignore[return-value]


# Online correction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correction:
    """Measured/predicted ratios, as moving averages, that scale the model's predictions."""

    step: float = 1.0
    attention: float = 1.0

    def observe_step(self, predicted_ms: float, measured_ms: float) -> Correction:
        return replace(self, step=_update(self.step, predicted_ms, measured_ms))

    def observe_attention(self, predicted_ms: float, measured_ms: float) -> Correction:
        return replace(self, attention=_update(self.attention, predicted_ms, measured_ms))


def _update(ratio: float, predicted_ms: float, measured_ms: float) -> float:
    if predicted_ms <= 0.0 or measured_ms <= 0.0:
        return ratio  # nothing measured yet, or a model that predicts nothing to scale
    low, high = RATIO_LIMITS
    sample = min(max(measured_ms / predicted_ms, low), high)
    return (1 - CORRECTION_WEIGHT) * ratio + CORRECTION_WEIGHT * sample
