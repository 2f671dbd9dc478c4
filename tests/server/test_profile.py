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
