"""Which KV transport `serve` gives a decode worker when each role has its own GPU."""

import pytest

from server.launch.serve import decode_kv_transfer


@pytest.mark.parametrize(
    ("requested", "decode_gpu", "prefill_gpus", "expected"),
    [
        ("auto", "1", ["0"], "nccl"),  # CUDA IPC cannot open a GPU this process does not see
        ("auto", "1", ["1", "0"], "nccl"),
        ("auto", "0", ["0"], "auto"),  # one shared GPU: CUDA IPC works
        ("auto", "0", ["0", "0"], "auto"),
        ("cuda_ipc", "1", ["0"], "cuda_ipc"),  # an explicit choice is never changed
        ("gloo", "1", ["0"], "gloo"),
    ],
)
def test_decode_kv_transfer(requested, decode_gpu, prefill_gpus, expected):
    assert decode_kv_transfer(requested, decode_gpu, prefill_gpus) == expected
