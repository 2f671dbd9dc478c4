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
