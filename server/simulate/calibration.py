"""Fits the roofline efficiencies (server/simulate/roofline.py) to per-operator GPU timings that
the Vidur project measured on real A100 and H100 GPUs (microsoft/vidur, MIT licence; a copy with
its provenance in ../shared/calibration/vidur/, see its README), and reports how well the fit
predicts rows it was not fitted on.

Fitting minimises the mean absolute log error (a robust relative error) with a small
Nelder-Mead over transformed parameters; numpy only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.simulate.hardware import GPUS, ModelShape
from server.simulate.roofline import (
    ELEMENTWISE_OPS,
    DecodeAttentionFit,
    DeviceFit,
    ElementwiseFit,
    GemmFit,
    LinkFit,
    PrefillAttentionFit,
    elementwise_bytes,
)

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "calibration" / "vidur"
VIDUR_COMMIT = "7d47513363ec447a741ac5e47241580b47724fbf"
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
DEVICES = {"a100": "a100-80g", "h100": "h100"}  # Vidur's folder -> our GPU preset
LINKS = {"a100": "a100_dgx", "h100": "h100_dgx"}


class CalibrationError(ValueError):
    pass


# Reading ----------------------------------------------------------------------------------------


@dataclass
class OperatorTable:
    """One `*.mlp.csv`: every row is one layer at `tokens` on `tp` GPUs; times[op] in ms."""

    shape: ModelShape
    tokens: np.ndarray
    tp: np.ndarray
    times: dict[str, np.ndarray]

    def where(self, mask: np.ndarray) -> OperatorTable:
        return OperatorTable(self.shape, self.tokens[mask], self.tp[mask],
                             {op: t[mask] for op, t in self.times.items()})  # fmt: skip


def read_operators(path: Path) -> OperatorTable:
    try:
        rows = list(csv.DictReader(path.open()))
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc}") from exc
    first = rows[0]
    heads, hidden = int(first["n_head"]), int(first["n_embd"])
    shape = ModelShape(
        num_layers=1, hidden=hidden, ffn=int(first["n_expanded_embd"]), num_heads=heads,
        num_kv_heads=int(first["n_kv_head"]), head_dim=hidden // heads,
        vocab=int(first["vocab_size"]), dtype_bytes=2,
    )  # fmt: skip
    ops = GEMM_OPS + ELEMENTWISE_OPS
    return OperatorTable(
        shape,
        np.array([float(r["num_tokens"]) for r in rows]),
        np.array([float(r["num_tensor_parallel_workers"]) for r in rows]),
        {op: np.array([float(r[f"time_stats.{op}.median"]) for r in rows]) for op in ops},
    )


def read_attention(path: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    dec = [r for r in rows if r["is_prefill"] == "False"]
    pre = [r for r in rows if r["is_prefill"] == "True"]
    tp = int(rows[0]["num_tensor_parallel_workers"])
    heads, kv_heads = int(rows[0]["n_q_head"]) // tp, int(rows[0]["n_kv_head"]) // tp
    head_dim = int(rows[0]["n_embd"]) // int(rows[0]["n_q_head"])
    return {
        "q_width": np.array(heads * head_dim),
        "kv_width": np.array(kv_heads * head_dim),
        "decode_rows": np.array([float(r["batch_size"]) for r in dec]),
        # kv_cache_size is each request's context: every row attends over it
        "decode_tokens": np.array(
            [float(r["batch_size"]) * float(r["kv_cache_size"]) for r in dec]
        ),
        "decode_ms": np.array([float(r["time_stats.attn_decode.median"]) for r in dec]),
        "prefill_chunk": np.array([float(r["prefill_chunk_size"]) for r in pre]),
        "prefill_context": np.array([float(r["kv_cache_size"]) for r in pre]),
        "prefill_ms": np.array([float(r["time_stats.attn_prefill.median"]) for r in pre]),
    }


def read_link(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, ms) of GPU pairs within one node (devices_per_node 2: NVLink)."""
    rows = [r for r in csv.DictReader(path.open()) if r["devices_per_node"] == "2"]
    return (np.array([float(r["size"]) for r in rows]),
            np.array([float(r["time_stats.send_recv.median"]) for r in rows]))  # fmt: skip


# Per-operator predictions over a table ----------------------------------------------------------


def gemm_dims(shape: ModelShape, op: str, tokens, tp):
    """(m, k, n) of one GPU's shard: column-parallel ops split n, row-parallel ones k."""
    k, n = shape.gemms()[op]
    if op in ("attn_pre_proj", "mlp_up_proj"):
        return tokens, k, n // tp
    return tokens, k // tp, n


def predict_table(fit: DeviceFit, gpu_name: str, table: OperatorTable) -> dict[str, np.ndarray]:
    g = GPUS[gpu_name]
    out = {}
    for op in GEMM_OPS:
        m, k, n = gemm_dims(table.shape, op, table.tokens, table.tp)
        out[op] = fit.gemm.ms(m, k, n, g.peak_flops, g.hbm_bandwidth, g.num_sms)
    for op in ELEMENTWISE_OPS:
        moved = elementwise_bytes(table.shape, op, table.tokens, table.tp)
        out[op] = fit.elementwise[op].ms(moved, g.hbm_bandwidth)
    return out


# Fitting ----------------------------------------------------------------------------------------


def nelder_mead(loss, x0, iterations: int = 1500, step: float = 0.5) -> np.ndarray:
    x0 = np.asarray(x0, dtype=float)
    points = [x0] + [x0 + step * e for e in np.eye(len(x0))]
    values = [loss(p) for p in points]
    for _ in range(iterations):
        order = np.argsort(values)
        points, values = [points[i] for i in order], [values[i] for i in order]
        centre = np.mean(points[:-1], axis=0)
        reflected = centre + (centre - points[-1])
        fr = loss(reflected)
        if fr < values[0]:
            expanded = centre + 2 * (centre - points[-1])
            fe = loss(expanded)
            points[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            points[-1], values[-1] = reflected, fr
        else:
            contracted = centre + 0.5 * (points[-1] - centre)
            fc = loss(contracted)
            if fc < values[-1]:
                points[-1], values[-1] = contracted, fc
            else:
                points = [points[0] + 0.5 * (p - points[0]) for p in points]
                values = [loss(p) for p in points]
    return points[int(np.argmin(values))]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _log_error(predicted, measured) -> float:
    with np.errstate(all="ignore"):
        err = np.abs(np.log(predicted) - np.log(measured))
    return float(np.nanmean(err)) if np.isfinite(err).all() else 1e9


def fit_gemm(gpu_name: str, tables: list[OperatorTable]) -> GemmFit:
    g = GPUS[gpu_name]
    dims = [gemm_dims(t.shape, op, t.tokens, t.tp) for t in tables for op in GEMM_OPS]
    dims = [np.broadcast_arrays(*d) for d in dims]
    m, k, n = (np.concatenate([d[i] for d in dims]).astype(float) for i in range(3))
    measured = np.concatenate([t.times[op] for t in tables for op in GEMM_OPS])

    def make(x) -> GemmFit:
        return GemmFit(_sigmoid(x[0]), _sigmoid(x[1]), 1 + math.exp(x[2]), math.exp(x[3]) * 1e-3)

    def loss(x) -> float:
        return _log_error(make(x).ms(m, k, n, g.peak_flops, g.hbm_bandwidth, g.num_sms), measured)

    return _rounded(make(nelder_mead(loss, [1.0, 1.0, 0.0, 1.0])))


def fit_elementwise(gpu_name: str, tables: list[OperatorTable]) -> dict[str, ElementwiseFit]:
    bandwidth = GPUS[gpu_name].hbm_bandwidth
    fits = {}
    for op in ELEMENTWISE_OPS:
        moved = np.concatenate([elementwise_bytes(t.shape, op, t.tokens, t.tp) for t in tables])
        measured = np.concatenate([t.times[op] for t in tables])

        def make(x) -> ElementwiseFit:
            return ElementwiseFit(_sigmoid(x[0]), math.exp(x[1]) * 1e-3)

        def loss(x, moved=moved, measured=measured) -> float:
            return _log_error(make(x).ms(moved, bandwidth), measured)

        fits[op] = _rounded(make(nelder_mead(loss, [0.0, 1.0], 600)))
    return fits


def fit_decode_attention(gpu_name: str, data: dict, rows=None) -> DecodeAttentionFit:
    bandwidth = GPUS[gpu_name].hbm_bandwidth
    sel = slice(None) if rows is None else rows
    b, kv, t = data["decode_rows"][sel], data["decode_tokens"][sel], data["decode_ms"][sel]

    def make(x) -> DecodeAttentionFit:
        return DecodeAttentionFit(_sigmoid(x[0]), math.exp(x[1]) * 1e-3, math.exp(x[2]) * 1e-4,
                                  math.exp(x[3]))  # fmt: skip

    def loss(x) -> float:
        return _log_error(make(x).ms(b, kv, int(data["kv_width"]), bandwidth), t)

    return _rounded(make(nelder_mead(loss, [1.0, 0.0, 0.0, 8.0], 2500)))


def fit_prefill_attention(gpu_name: str, data: dict, rows=None) -> PrefillAttentionFit:
    peak = GPUS[gpu_name].peak_flops
    sel = slice(None) if rows is None else rows
    c, ctx, t = data["prefill_chunk"][sel], data["prefill_context"][sel], data["prefill_ms"][sel]

    def make(x) -> PrefillAttentionFit:
        return PrefillAttentionFit(_sigmoid(x[0]), math.exp(x[1]) * 1e-3, math.exp(x[2]) * 1e-5,
                                   math.exp(x[3]))  # fmt: skip

    def loss(x) -> float:
        return _log_error(make(x).ms(c, ctx, int(data["q_width"]), peak), t)

    return _rounded(make(nelder_mead(loss, [0.0, 0.0, 0.0, 5.0], 3000)))


def fit_link(nbytes: np.ndarray, ms: np.ndarray) -> LinkFit:
    """Least squares of ms = latency + bytes / bandwidth, weighted to relative error."""
    w = 1.0 / ms
    design = np.stack([np.ones_like(nbytes), nbytes], axis=1) * w[:, None]
    (latency, per_byte), *_ = np.linalg.lstsq(design, ms * w, rcond=None)
    return LinkFit(round(max(float(latency), 1e-4), 6), round(1e3 / float(per_byte), -6))


def _rounded(fit):
    values = {k: float(f"{v:.6g}") for k, v in fit.__dict__.items()}
    return type(fit)(**values)


# The device fits shipped in server/simulate/fits/ -----------------------------------------------


def fit_device(folder: str, root: Path = DEFAULT_DIR) -> DeviceFit:
    """A100 or H100 from every table measured on it. Attention timings exist for A100 only:
    H100 takes A100's attention efficiencies as fractions of its own peak (an assumption)."""
    gpu_name = DEVICES[folder]
    tables = [read_operators(p) for p in sorted((root / folder).glob("*.mlp.csv"))]
    if not tables:
        raise CalibrationError(f"no *.mlp.csv under {root / folder}")
    attention = read_attention(root / "a100" / "attention.n_embd8192-q64-kv8-tp2.csv")
    attention_gpu = "a100-80g"
    link = read_link(root / "network" / f"{LINKS[folder]}.send_recv.csv")
    return DeviceFit(
        gemm=fit_gemm(gpu_name, tables),
        elementwise=fit_elementwise(gpu_name, tables),
        decode_attention=fit_decode_attention(attention_gpu, attention),
        prefill_attention=fit_prefill_attention(attention_gpu, attention),
        link=fit_link(*link),
        source={
            "measurements": "microsoft/vidur data/profiling (MIT licence)",
            "commit": VIDUR_COMMIT,
            "tables": [f"{folder}/{p.name}" for p in sorted((root / folder).glob("*.mlp.csv"))],
            "attention": "a100/attention.n_embd8192-q64-kv8-tp2.csv (older commit e2d00e9)",
            "link": f"network/{LINKS[folder]}.send_recv.csv (2 GPUs in one node)",
        },
    )


# Held-out errors --------------------------------------------------------------------------------


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    err = np.abs(predicted - measured) / measured
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
            "rows": int(len(err))}  # fmt: skip


def cross_model_errors(root: Path = DEFAULT_DIR) -> list[dict]:
    """Fit on one model's table (every tensor-parallel degree), predict the other's rows at
    tensor-parallel 1: per operator, and for the whole layer (the sum of its operators)."""
    report = []
    pairs = [("Llama-2-7b-hf", "Llama-2-70b-hf"), ("Llama-2-70b-hf", "Llama-2-7b-hf")]
    for folder, gpu_name in DEVICES.items():
        for fitted_on, predicted in pairs:
            train = read_operators(root / folder / f"{fitted_on}.mlp.csv")
            test = read_operators(root / folder / f"{predicted}.mlp.csv")
            test = test.where(test.tp == 1)
            fit = DeviceFit(
                gemm=fit_gemm(gpu_name, [train]), elementwise=fit_elementwise(gpu_name, [train]),
                decode_attention=None, prefill_attention=None, link=None,
            )  # fmt: skip
            pred = predict_table(fit, gpu_name, test)
            ops = GEMM_OPS + ELEMENTWISE_OPS
            row = {
                "gpu": gpu_name, "fitted_on": fitted_on, "predicted": predicted,
                "operators": _errors(np.concatenate([pred[o] for o in ops]),
                                     np.concatenate([test.times[o] for o in ops])),
                "gemms": _errors(np.concatenate([pred[o] for o in GEMM_OPS]),
                                 np.concatenate([test.times[o] for o in GEMM_OPS])),
                "layer": _errors(sum(pred[o] for o in ops), sum(test.times[o] for o in ops)),
                "by_operator": {o: _errors(pred[o], test.times[o])["median"] for o in ops},
            }  # fmt: skip
            report.append(row)
    return report


def attention_errors(root: Path = DEFAULT_DIR) -> list[dict]:
    """A100 attention (one shape only): fit on every other context length (decode) or chunk
    size (prefill), predict the rest."""
    data = read_attention(root / "a100" / "attention.n_embd8192-q64-kv8-tp2.csv")
    g = GPUS["a100-80g"]
    per_request = data["decode_tokens"] / data["decode_rows"]
    contexts = np.unique(per_request)
    train = np.isin(per_request, contexts[::2])
    fit = fit_decode_attention("a100-80g", data, train)
    test = ~train
    pred = fit.ms(data["decode_rows"][test], data["decode_tokens"][test],
                  int(data["kv_width"]), g.hbm_bandwidth)  # fmt: skip
    rows = [{"operator": "attn_decode", **_errors(pred, data["decode_ms"][test])}]
    chunks = np.unique(data["prefill_chunk"])
    train = np.isin(data["prefill_chunk"], chunks[::2])
    pfit = fit_prefill_attention("a100-80g", data, train)
    test = ~train
    pred = pfit.ms(data["prefill_chunk"][test], data["prefill_context"][test],
                   int(data["q_width"]), g.peak_flops)  # fmt: skip
    rows.append({"operator": "attn_prefill", **_errors(pred, data["prefill_ms"][test])})
    return rows
