"""`adrenaline bench` and `simulate` need no tensors: building the CLI's parser and importing the
simulator must not import torch (seconds of every start). A subprocess, since this one has torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Importing torch fails with the stack that asked for it, so a failure names the culprit.
CHILD = """
import sys, traceback

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ImportError("torch imported by:\\n" + "".join(traceback.format_stack()))

sys.meta_path.insert(0, NoTorch())
import server.cli
server.cli.build_parser()
import server.bench.cli, server.simulate.cluster, server.simulate.deployment
assert server.cli.main(["simulate", "--gpu", "h100", "--num-prompts", "4", "--disable-tqdm",
                        "--serve-args", "--model llama-2-7b --offload-policy load-aware"]) == 0
assert "torch" not in sys.modules
"""


def test_parser_bench_and_simulator_import_no_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
