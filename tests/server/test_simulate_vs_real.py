"""A small version of benchmarks/sim_vs_real.py: the simulator's prediction of a real
`adrenaline serve --model tiny` on this machine (profiled first), at a light and a saturating
rate. Bounds are tolerant: other jobs share these cores (the test measures the processes they
keep runnable and the simulation shares the cores with as many); the benchmark reports the
tight comparison."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.sim_vs_real import SERVE, bench_args, profile, real_runs, simulated_runs


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> tuple[Path, float]:
    """The profile, and the runnable processes other jobs kept while it ran."""
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    return path, profile(path, quick=True)


def test_simulation_tracks_the_real_server(profiled):
    class Args:
        num_prompts, sim_args = 60, ""

    profile_path, competitors = profiled
    bargs = bench_args(Args, profile_path)
    real = real_runs(Args, bargs, profile_path, "none", [10.0, float("inf")], quick=True)
    sim = simulated_runs(bargs, "none", real, competitors)
    why = explain(real, sim)
    light, saturated = zip(real, sim)
    for r, s in (light, saturated):
        assert r["completed"] == s["completed"] == 60, SERVE
    # Light load: throughput follows the arrivals; TPOT is one decode step or so.
    assert sim[0]["output_throughput"] == pytest.approx(real[0]["output_throughput"], rel=0.3), why
    assert 0.5 < sim[0]["median_tpot_ms"] / real[0]["median_tpot_ms"] < 2.0, why
    # Saturated: the decode worker's capacity, shared with the other roles on these cores.
    assert 0.6 < sim[1]["output_throughput"] / real[1]["output_throughput"] < 1.6, why


def explain(real: list[dict], sim: list[dict]) -> str:
    """What a failure needs: each run's figures, real and simulated, and what the machine did."""
    keys = ("output_throughput", "median_tpot_ms", "median_ttft_ms", "duration")
    lines = []
    for r, s in zip(real, sim):
        decode = [p["model"]["decode"] for p in r["profiles"]]
        lines.append(
            f"rate {r['request_rate']}: "
            + ", ".join(f"{k} {r[k]:.1f}/{s[k]:.1f}" for k in keys)
            + f" (real/sim); others' cores {r['background_cores']:.2f}, runnable"
            f" {r['competitors']:.2f}; drift {s['drift']:.2f}; decode fits around it {decode}"
        )
    return "\n".join(lines)
