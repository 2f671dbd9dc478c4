"""The 2-rank torch.distributed group of one pair of processes (a KV link, a per-layer attention
link), formed on a TCPStore without a global group.

A TCPStore authenticates nobody, so with a cluster key the pair rendezvous under a prefix only
key holders can compute, and then, over the group itself, each side proves it holds the key
(an HMAC over both sides' fresh nonces and its rank): whoever won the store's rendezvous is the
peer that must answer, so a process that merely reached the store is refused before any tensor
moves. Without a key, pairs form as before.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.security import ClusterKey

log = logging.getLogger(__name__)

NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_NONCE_BYTES = 32
_MAC_BYTES = 32


class PairAuthError(RuntimeError):
    """The peer in a pair group could not prove it holds the cluster key."""


def make_group(backend: str, store: dist.Store, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """Blocks until both ranks of the pair joined (or timeout_s passed)."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        # Read when the group is made. torch's default (3) tears the process down when an op
        # times out; 2 only aborts the communicator, so the caller's recovery (a new group
        # under a new generation, or a new link) runs.
        if os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, "2") in ("1", "3"):
            log.warning("%s=%s: a timed-out NCCL op will end this process", NCCL_ERROR_HANDLING_ENV,
                        os.environ[NCCL_ERROR_HANDLING_ENV])  # fmt: skip
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    raise ValueError(f"unknown point-to-point backend {backend!r}")


def join_pair(
    backend: str,
    store: dist.Store,
    rank: int,
    timeout_s: float,
    label: str,
    cluster_key: ClusterKey | None = None,
    device: torch.device | str = "cpu",
) -> dist.ProcessGroup:
    """The pair's group under `label` (the same string on both sides); with a key, only once
    the peer proved it holds it. Raises PairAuthError, or torch's error on a timeout."""
    if cluster_key is None:
        return make_group(backend, dist.PrefixStore(label, store), rank, timeout_s)
    prefix = "pair-" + cluster_key.mac("p2p-rendezvous", label)[:32]
    group = make_group(backend, dist.PrefixStore(prefix, store), rank, timeout_s)
    _prove_key(group, rank, cluster_key, label, torch.device(device), timeout_s)
    return group


def _prove_key(
    group: dist.ProcessGroup,
    rank: int,
    key: ClusterKey,
    label: str,
    device: torch.device,
    timeout_s: float,
) -> None:
    """Rank 0 sends a nonce; rank 1 answers with its nonce and its MAC over both; rank 0 checks
    it and sends its own MAC (zeros if the peer failed, so it fails at once, not on a timeout)."""
    peer = 1 - rank
    wait = timedelta(seconds=timeout_s)

    def send(data: bytes) -> None:
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        group.send([tensor], peer, 0).wait(wait)

    def recv(size: int) -> bytes:
        tensor = torch.empty(size, dtype=torch.uint8, device=device)
        group.recv([tensor], peer, 0).wait(wait)
        return bytes(tensor.cpu().tolist())

    def mac(of_rank: int, nonce0: bytes, nonce1: bytes) -> bytes:
        return bytes.fromhex(key.mac("p2p-pair", label, of_rank, nonce0, nonce1))

    mine = secrets.token_bytes(_NONCE_BYTES)
    if rank == 0:
        send(mine)
        answer = recv(_NONCE_BYTES + _MAC_BYTES)
        theirs, their_mac = answer[:_NONCE_BYTES], answer[_NONCE_BYTES:]
        ok = secrets.compare_digest(their_mac, mac(1, mine, theirs))
        send(mac(0, mine, theirs) if ok else bytes(_MAC_BYTES))
    else:
        theirs = recv(_NONCE_BYTES)
        send(mine + mac(1, theirs, mine))
        ok = secrets.compare_digest(recv(_MAC_BYTES), mac(0, theirs, mine))
    if not ok:
        raise PairAuthError(
            f"the peer of pair {label!r} does not hold this deployment's cluster key; check "
            "that every role was started with the same --cluster-key"
        )
