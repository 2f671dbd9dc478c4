"""torch.distributed pairs under a cluster key, in one process (two threads, gloo): KV moves
between holders of the key; a sender with another key or none is refused and its send fails
cleanly; a peer that wins a pair's rendezvous without the key fails the proof on both sides."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.distributed as dist

from transport.kv_transfer import KVSender, create_pool_host
from transport.kv_transfer_base import KVTransferError
from transport.p2p_group import PairAuthError, _prove_key, make_group
from transport.security import ClusterKey, generate_cluster_key

SHAPE = (2, 2, 8, 4, 2, 8)  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]


def new_key() -> ClusterKey:
    return ClusterKey.parse(generate_cluster_key(), "test")


@pytest.fixture
def key() -> ClusterKey:
    return new_key()


@pytest.fixture
def host(key):
    host = create_pool_host("gloo", SHAPE, torch.float32, torch.device("cpu"), "decode-0",
                            cluster_key=key)  # fmt: skip
    yield host
    host.close()


def test_kv_moves_between_holders_of_the_key(host, key):
    src_pool = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    future = host.expect(1, "prefill-0", [5, 2])
    sender = KVSender(src_pool, "prefill-0", key)
    try:
        sender.send(1, host.endpoint, [0, 3], [5, 2], timeout_s=20)
        future.result(timeout=20)
    finally:
        sender.close()
    assert torch.equal(host.pool[:, :, [5, 2]], src_pool[:, :, [0, 3]])


@pytest.mark.parametrize("sender_key", [new_key(), None], ids=["wrong key", "no key"])
def test_a_sender_without_the_key_is_refused_and_its_send_fails(host, sender_key, caplog):
    future = host.expect(2, "prefill-9", [1])
    sender = KVSender(torch.ones(SHAPE), "prefill-9", sender_key)
    with caplog.at_level(logging.ERROR, logger="transport.gloo_transfer"):
        with pytest.raises(KVTransferError, match="failed"):
            sender.send(2, host.endpoint, [0], [1], timeout_s=2)
    sender.close()
    assert "refused a KV message" in caplog.text or "no --cluster-key" in caplog.text
    assert not future.done() and not host.pool.any()  # nothing landed; cancel() frees it
    host.cancel(2)


def test_a_peer_that_wins_the_rendezvous_without_the_key_fails_the_proof():
    store = dist.HashStore()
    keys = [new_key(), new_key()]
    errors: list[Exception | None] = [None, None]

    def rank(r: int) -> None:
        group = make_group("gloo", dist.PrefixStore("pair", store), r, 10)
        try:
            _prove_key(group, r, keys[r], "pair", torch.device("cpu"), 10)
        except PairAuthError as exc:
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(isinstance(e, PairAuthError) for e in errors), errors


def test_a_gloo_attention_link_forms_between_holders_of_the_key(key):
    from transport.nccl_attention_channel import P2PDecodeSideLink, P2PExecutorSideLink

    dims = dict(max_rows=4, num_heads=2, num_kv_heads=1, head_dim=8)
    decode_side = P2PDecodeSideLink("gloo", **dims, dtype=torch.float32, device="cpu",
                                    cluster_key=key)  # fmt: skip

    def executor() -> None:
        link = P2PExecutorSideLink(decode_side.endpoint, cluster_key=key)
        link.begin_step(1, 3, 1)
        q, _, _ = link.receive(1, 10)
        link.respond(1, q * 2)

    thread = threading.Thread(target=executor)
    thread.start()
    q = torch.randn(3, 2, 8)
    decode_side.post(1, q, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8))
    assert torch.equal(decode_side.collect(1, 1, 3, 10), q * 2)
    thread.join(timeout=10)
    decode_side.close()
