"""CUDA IPC or NCCL between two GPUs, decided from their UUIDs and one peer-access answer
(transport.link_choice), and the decode side's offload link following that decision."""

from __future__ import annotations

import pytest
import torch

from transport import cuda_ipc_transfer
from transport.link_choice import choose_link
from transport.messages import Register, WorkerStats, decode, encode

A, B = "GPU-aaaa", "GPU-bbbb"


@pytest.mark.parametrize(
    "requested, local, peer, access, kind",
    [
        ("auto", A, A, False, "cuda_ipc"),  # one GPU: no peer access needed
        ("auto", A, B, True, "cuda_ipc"),
        ("auto", A, B, False, "nccl"),  # not visible here, or no peer access
        ("auto", A, "", False, "cuda_ipc"),  # the peer did not say: today's behaviour
        ("auto", "", "", False, "shm"),  # CPU
        ("nccl", A, A, True, "nccl"),  # an explicit kind is kept
        ("gloo", "", "", False, "gloo"),
        ("cuda_ipc", A, B, False, "cuda_ipc"),  # kept: its import then names the problem
    ],
)
def test_choose_link(requested, local, peer, access, kind) -> None:
    choice = choose_link(requested, local, peer, access)
    assert choice.kind == kind
    if kind == "nccl" and requested == "auto":
        assert A in choice.reason and B in choice.reason


def test_register_names_the_gpu_and_defaults_to_none() -> None:
    stats = WorkerStats(0, 0, 0, 0, 0, 0, 0)
    old = Register("decode", "decode-0", 1, "tiny", 256, {}, stats)
    assert decode(encode(old)).gpu_uuid == ""
    assert (
        decode(encode(Register("decode", "d", 1, "tiny", 256, {}, stats, gpu_uuid=A))).gpu_uuid == A
    )


def test_offload_client_takes_nccl_to_an_executor_gpu_it_cannot_map(monkeypatch) -> None:
    """The decision's GPU inputs faked: the decode side on GPU A, the executor's GPU B not
    reachable. The link made is the P2P one (gloo stands in for NCCL on CPU)."""
    from server.roles.offload_client import OffloadClient

    monkeypatch.setattr(cuda_ipc_transfer, "device_uuid", lambda index: A)
    monkeypatch.setattr(cuda_ipc_transfer, "peer_reachable", lambda uuid: uuid == A)
    monkeypatch.setattr(torch.cuda, "device", lambda index: _NoDevice())
    made = []

    class FakeP2PLink:
        def __init__(self, kind, *args, **kwargs) -> None:
            made.append(kind)

    monkeypatch.setattr("transport.nccl_attention_channel.P2PDecodeSideLink", FakeP2PLink)
    monkeypatch.setattr("transport.cuda_attention_channel.CudaDecodeSideLink",
                        lambda *a: made.append("cuda_ipc"))  # fmt: skip
    client = OffloadClient("decode-0", 2, 4, 4, 2, 8, torch.float32, "cpu")
    try:
        client.device = torch.device("cuda", 0)  # only the choice runs; no tensor is made
        client._make_link("attention-0", B)
        client._make_link("attention-1", A)
    finally:
        client.ctx.term()
    assert made == ["nccl", "cuda_ipc"]


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
