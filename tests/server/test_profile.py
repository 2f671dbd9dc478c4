"""`adrenaline profile` measures the engine on this device and writes a profile the router loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scheduler.cost_model import CostModel


def test_profile_command_writes_a_loadable_profile(tmp_path, adrenaline_cache):
    out = tmp_path / "profile.json"
    adrenaline = Path(sys.executable).parent / "adrenaline"
    subprocess.run(
        [str(adrenaline), "profile", "--model", "tiny", "--quick", "--grid", "tiny",
         "--output", str(out), "--log-level", "WARNING"],
        check=True, timeout=120,
    )  # fmt: skip
    model = CostModel.load(out)
    assert model.num_layers == 4 and model.model == "tiny" and model.device == "cpu"
    assert model.decode_step_ms(4, 256) > 0
    assert all(slope >= 0 for slope in (*model.decode[1:], *model.attention[1:], model.prefill[1]))
    assert model.offloaded_step_ms(4) > 0 and model.offloaded != (0.0, 0.0)  # measured on a CPU


def test_offloaded_steps_are_timed_through_the_real_client_and_link(adrenaline_cache):
    """The profile's offloaded steps run the decode worker's own code: the step plans go out
    over ZeroMQ and every layer's rows through the shared-memory link, answered by its
    executor end; the requests leave nothing behind."""
    from engine.config import EngineConfig, ModelConfig
    from engine.engine import LLMEngine
    from engine.model_source import resolve_model
    from server.profile_offload import AnsweringExecutor, measure_offloading
    from transport.attention_protocol import RESPONSE

    cfg = ModelConfig.from_model_dir(resolve_model("tiny"))
    answering = AnsweringExecutor(cfg, 8, "float32")
    engine = LLMEngine(EngineConfig(model="tiny"), remote=answering)
    free = engine.block_manager.num_free_blocks
    try:
        offloaded, exchange = measure_offloading(engine, answering, (1, 4), 16, 2, 0.0)
        # Three points (one a warm-up), each a mixed and an offloaded run of at least
        # one untimed and two timed steps.
        steps = answering.client.step_id
        assert steps >= 3 * 2 * 3
        # The last step's last layer answered: step s's layer l is sequence s * layers + l + 1.
        assert answering.link.signals.read(RESPONSE) == (steps + 1) * cfg.num_layers
        assert answering.executor_s > 0
    finally:
        answering.close()
    assert [n for n, _ in offloaded] == [1, 4] and [n for n, _ in exchange] == [1, 4]
    assert all(ms > 0 for _, ms in offloaded) and all(ms >= 0 for _, ms in exchange)
    assert not engine.requests and engine.block_manager.num_free_blocks == free


def test_the_profiles_plan_sink_drops_whatever_else_connects(adrenaline_cache):
    """The socket the profile's step plans go to is open on loopback while it runs: frames of
    any count, size or content from another peer are dropped, and the link still answers."""
    import time

    import torch
    import zmq

    from engine.config import ModelConfig
    from engine.model_source import resolve_model
    from server.profile_offload import AnsweringExecutor
    from transport.security import MAX_FRAME_BYTES

    cfg = ModelConfig.from_model_dir(resolve_model("tiny"))
    answering = AnsweringExecutor(cfg, 8, "float32")
    peer = answering.client.ctx.socket(zmq.DEALER)
    try:
        peer.connect(answering.sink.getsockopt(zmq.LAST_ENDPOINT).decode())
        peer.send_multipart([b"\xc1", b"", (1 << 65).to_bytes(9, "big"), b"nan"])
        peer.send(b"\0" * 16)
        time.sleep(0.2)
        answering.drain()
        assert not answering.sink.poll(0)
        peer.send(b"\0" * (MAX_FRAME_BYTES + 1))  # over the limit: the peer is dropped
        time.sleep(0.2)
        answering.drain()
        assert not answering.sink.poll(0)
        step = answering.begin_step(0, [("profile-executor", [("r", 0)])])
        shape = (1, cfg.num_heads, cfg.head_dim)
        q = torch.full(shape, 2.0)
        k = torch.zeros(1, cfg.num_kv_heads, cfg.head_dim)
        step.send(0, q, k, k)
        assert torch.equal(step.receive(0), q)  # the in-thread executor end answers with q
    finally:
        peer.close(0)
        answering.close()
