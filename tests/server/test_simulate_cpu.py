"""The simulator's shared CPU (`simulate --profile`): an attention executor polls for the next
layer's rows between its layers (transport/host_signal_channel.wait_for spins, runnable), so it
holds a share of the cores from its attention's end until the decode step it serves ends."""

from __future__ import annotations

import json

import pytest

from scheduler.cost_model import builtin_profile
from server.cli import build_parser
from server.simulate.cluster import Workload
from server.simulate.deployment import build, hardware, parse_serve_args


def test_an_executor_holds_a_core_between_its_layers(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(builtin_profile().to_json()))
    args = build_parser().parse_args(
        ["simulate", "--num-prompts", "12", "--seed", "0", "--profile", str(profile)]
    )
    serve = parse_serve_args(f"--model tiny --profile {profile}", "ratio:1.0")
    hw = hardware(args, serve)
    sim, _ = build(args, serve, hw)
    executor = sim.executors["attention-0"]
    held, hold, drop = [], sim.cpu.hold, sim.cpu.drop

    def noted_hold(owner):
        if owner == executor.poll_key:
            held.append((sim.loop.now, executor.serving, executor in sim.cpu.active))
        hold(owner)

    sim.cpu.hold = noted_hold
    sim.cpu.drop = lambda owner: (drop(owner), held.append((sim.loop.now, None, None)))[0]
    done = sim.run(Workload([64] * 12, [24] * 12, [0.01 * i for i in range(12)]))

    assert [r.output_tokens for r in done] == [24] * 12
    holds = [entry for entry in held if entry[1] is not None]
    # Held once per offloaded step, only while serving it, never while its own work still runs
    # (that is counted already), and dropped by the step's end: nothing is held at the end.
    assert len(holds) > 12 and all(serving for _, serving, _ in holds)
    assert not any(working for *_, working in holds)
    assert executor.poll_key not in sim.cpu.holders and not executor.polling


def test_the_clients_cpu_per_request_comes_before_the_router_has_it(tmp_path):
    """bench's clock starts before it builds and sends a request: its CPU per request
    (--sim-client-request-ms) is part of TTFT, as a raw HTTP client shows it is here."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(builtin_profile().to_json()))

    def ttfts(client_ms: float) -> list[float]:
        args = build_parser().parse_args(["simulate", "--profile", str(profile),
                                          "--sim-client-request-ms", str(client_ms)])  # fmt: skip
        serve = parse_serve_args(f"--model tiny --profile {profile}", "none")
        hw = hardware(args, serve)
        sim, _ = build(args, serve, hw)
        done = sim.run(Workload([64] * 4, [8] * 4, [1.0 * i for i in range(4)]))
        return [r.ttft for r in done]

    # One request at a time, on an idle machine: each waits exactly the client's extra 10 ms.
    for low, high in zip(ttfts(1.0), ttfts(11.0)):
        assert high - low == pytest.approx(0.010, rel=0.02)
