"""The cost model: least squares recovers known coefficients, profiles round-trip through JSON,
and the online correction moves predictions toward measurements."""

from __future__ import annotations

import json
import random

import pytest

from scheduler.cost_model import (
    Correction,
    CostModel,
    ProfileError,
    builtin_profile,
    fit_cost_model,
    fit_linear,
)

MODEL = CostModel(
    num_layers=4, decode=(2.0, 0.05, 0.001), attention=(0.1, 0.0002, 0.01),
    prefill=(3.0, 0.02, 1e-5),
)  # fmt: skip


def test_fit_recovers_known_coefficients_from_noisy_samples():
    rng = random.Random(0)
    decode, attention, prefill = [], [], []
    for batch in (1, 2, 4, 8, 16, 32):
        for tokens in (64, 256, 1024, 4096):
            noise = 1 + rng.uniform(-0.01, 0.01)
            decode.append(
                (batch, batch * tokens, MODEL.decode_step_ms(batch, batch * tokens) * noise)
            )
            attention.append(
                (batch * tokens, batch, MODEL.attention_layer_ms(batch * tokens, batch) * noise)
            )
    prefill = [(n, MODEL.prefill_ms(n)) for n in (16, 64, 256, 1024)]
    fitted = fit_cost_model(4, decode, attention, prefill)
    for got, want in [(fitted.decode, MODEL.decode), (fitted.attention, MODEL.attention)]:
        assert got == pytest.approx(want, rel=0.05, abs=1e-3)
    assert fitted.prefill == pytest.approx(MODEL.prefill, rel=1e-6)


def test_a_relative_fit_keeps_short_prompts_right():
    # A fixed cost, then attention's square: an absolute fit follows the long prompts and
    # misses a short one by most of its time; the relative fit is within a few percent of all.
    true = CostModel(4, MODEL.decode, MODEL.attention, prefill=(3.5, 0.02, 1e-5))
    sizes = (16, 64, 256, 1024, 2048)
    samples = [(n, true.prefill_ms(n) * (1.03 if i % 2 else 0.97)) for i, n in enumerate(sizes)]
    w = fit_linear([(n, n * n) for n, _ in samples], [t for _, t in samples], relative=True)
    line = fit_linear([(n,) for n, _ in samples], [t for _, t in samples])
    for n in (4, *sizes):
        predicted = w[0] + w[1] * n + w[2] * n * n
        assert predicted == pytest.approx(true.prefill_ms(n), rel=0.08), n
    assert line[0] + line[1] * 4 < 0.6 * true.prefill_ms(4)  # the old fit, for contrast


def test_a_steps_chunks_pay_attention_per_prompt():
    # Eight prompts of 256 in one step are not one prompt of 2,048: attention is per prompt.
    eight = MODEL.prefill_chunks_ms([(256, 0)] * 8)
    p0, p1, p2 = MODEL.prefill
    assert eight == pytest.approx(p0 + p1 * 2048 + p2 * 8 * 256**2)
    assert eight < MODEL.prefill_ms(2048)
    # A prompt in two chunks does the whole prompt's work, plus one more step's fixed cost.
    halves = MODEL.prefill_chunks_ms([(512, 0)]) + MODEL.prefill_chunks_ms([(512, 512)])
    assert halves == pytest.approx(MODEL.prefill_ms(1024) + p0)


def test_a_two_coefficient_profile_still_loads(tmp_path):
    path = tmp_path / "old.json"
    data = {**MODEL.to_json(), "prefill": [3.0, 0.02]}
    path.write_text(json.dumps(data))
    old = CostModel.load(path)
    assert old.prefill == (3.0, 0.02) and old.prefill_ms(100) == pytest.approx(5.0)
    path.write_text(json.dumps({**data, "prefill": [1.0]}))
    with pytest.raises(ProfileError, match="2 to 3 coefficients"):
        CostModel.load(path)


def test_a_slope_that_fits_negative_is_dropped():
    # Time falls with the second feature only by noise: its slope must not go below zero.
    features = [(b, c) for b in (1, 2, 4) for c in (10, 20, 30)]
    targets = [1.0 + 0.5 * b - 0.001 * c for b, c in features]
    w = fit_linear(features, targets)
    assert w[2] == 0.0 and w[1] == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ProfileError):
        fit_linear([(1.0, 2.0)], [3.0])


def test_profile_json_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    MODEL.save(path)
    assert CostModel.load(path) == MODEL
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ProfileError, match="version"):
        CostModel.load(path)
    with pytest.raises(ProfileError):
        CostModel.load(tmp_path / "missing.json")


def test_a_profile_without_offloading_measured_costs_an_offloaded_step_as_a_decode_step(
    tmp_path,
):
    path = tmp_path / "profile.json"
    measured = CostModel(4, MODEL.decode, MODEL.attention, MODEL.prefill, offloaded=(1.5, 0.04),
                         exchange=(0.03, 0.001))  # fmt: skip
    measured.save(path)
    assert CostModel.load(path) == measured
    assert measured.offloaded_step_ms(10) == pytest.approx(1.5 + 0.4)
    assert measured.exchange_layer_ms(10) == pytest.approx(0.04)
    assert measured.exchange_layer_ms(0) == 0.0  # no offloaded row: no exchange
    data = json.loads(path.read_text())
    del data["offloaded"], data["exchange"]  # as profiles written before them
    path.write_text(json.dumps(data))
    older = CostModel.load(path)
    assert (older.offloaded, older.exchange) == ((0.0, 0.0), (0.0, 0.0))
    assert older.offloaded_step_ms(10) == older.decode_step_ms(10, 0)
    for bad in ([1.0], 3, [1.0, "x"]):
        path.write_text(json.dumps({**data, "exchange": bad}))
        with pytest.raises(ProfileError, match="malformed"):
            CostModel.load(path)


def test_builtin_profile_loads_and_predicts_positive_times():
    model = builtin_profile()
    assert model.num_layers > 0
    assert model.decode_step_ms(8, 4096) > 0 and model.attention_layer_ms(4096, 8) > 0
    assert model.attention_layer_ms(0, 0) == 0.0  # no offloaded request: no executor work


def test_per_layer_time_is_step_time_over_layers():
    assert MODEL.decode_layer_ms(10, 1000) == pytest.approx(MODEL.decode_step_ms(10, 1000) / 4)


def test_correction_moves_predictions_toward_measurements():
    c = Correction()
    errors = []
    for _ in range(30):
        errors.append(abs(10.0 * c.step - 20.0))
        c = c.observe_step(predicted_ms=10.0, measured_ms=20.0)
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert c.step == pytest.approx(2.0, rel=0.01)
    assert c.attention == 1.0  # the other ratio is untouched
    assert c.observe_attention(0.0, 5.0) == c  # nothing predicted: nothing to scale
