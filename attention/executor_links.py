"""An attention executor's links to its decode workers. An AttachLink is checked field by field
before its link is installed (on failure the old one stays); a link then serves steps only from
the socket identity that attached it, each with a later step id than the last it served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transport.attention_channel import BadLinkEndpoint, ExecutorSideLink, link_dims
from transport.kv_transfer_base import dtype_to_str
from transport.messages import AttachLink, AttentionStep, ReleaseOffloaded
from transport.security import ClusterKey

log = logging.getLogger(__name__)

# Sequence numbers are step_id * num_layers + layer + 1 in int64 counters.
MAX_STEP_ID = 1 << 40
MAX_CONNECT_TIMEOUT_S = 60  # a P2P attach blocks the executor while the pair group forms
_FIELD_TYPES = {
    "shm": {"name": str},
    "cuda_ipc": {"nbytes": int, "device": int, "handle": str, "storage_size_bytes": int,
                 "storage_offset_bytes": int, "ref_counter_handle": str,
                 "ref_counter_offset": int, "event_handle": str, "event_sync_required": int,
                 "tensor_offset": int},
    "gloo": {"host": str, "port": int, "connect_timeout_s": int},
    "nccl": {"host": str, "port": int, "connect_timeout_s": int},
}  # fmt: skip


class LinkRejected(ValueError):
    """An AttachLink, step or release this executor will not act on; the message says why."""


@dataclass(frozen=True)
class LinkShape:
    """What every link to this executor must carry: the model's attention shape."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str


@dataclass
class _Attached:
    identity: bytes
    link: Any  # ExecutorSideLink, CudaExecutorSideLink or P2PExecutorSideLink
    max_rows: int
    last_step_id: int = 0


def check_endpoint(endpoint: dict, shape: LinkShape) -> int:
    """Raises BadLinkEndpoint unless every field has its type and the link fits this model;
    returns the link's row capacity."""
    kind = endpoint.get("kind", "shm")
    if kind not in _FIELD_TYPES:
        raise BadLinkEndpoint(f"unknown link kind {kind!r}")
    max_rows, num_heads, num_kv_heads, head_dim, dtype = link_dims(endpoint)
    got = LinkShape(num_heads, num_kv_heads, head_dim, dtype_to_str(dtype))
    if got != shape:
        raise BadLinkEndpoint(f"link shape {got} does not match this executor's {shape}")
    for field, kind_of in _FIELD_TYPES[kind].items():
        if type(endpoint.get(field)) is not kind_of:
            raise BadLinkEndpoint(f"{kind} link field {field!r} must be {kind_of.__name__}")
    if kind in ("gloo", "nccl") and not 0 < endpoint["connect_timeout_s"] <= MAX_CONNECT_TIMEOUT_S:
        raise BadLinkEndpoint(f"connect_timeout_s must be in (0, {MAX_CONNECT_TIMEOUT_S}]")
    return max_rows


def open_executor_link(endpoint: dict, cluster_key: ClusterKey | None = None):
    """The executor's end of a decode worker's link, by the endpoint's kind."""
    kind = str(endpoint.get("kind", "shm"))
    if kind == "cuda_ipc":
        from transport.cuda_attention_channel import CudaExecutorSideLink

        return CudaExecutorSideLink(endpoint)
    if kind in ("gloo", "nccl"):
        from transport.nccl_attention_channel import P2PExecutorSideLink

        return P2PExecutorSideLink(endpoint, cluster_key=cluster_key)
    return ExecutorSideLink(endpoint)


class ExecutorLinks:
    def __init__(self, cluster_key: ClusterKey | None = None) -> None:
        self.cluster_key = cluster_key
        self._by_decode: dict[str, _Attached] = {}

    def attach(self, identity: bytes, msg: AttachLink, shape: LinkShape | None):
        """Installs the link (returned, for the caller's hooks) or raises LinkRejected."""
        if identity != msg.decode_instance.encode():
            raise LinkRejected(f"AttachLink for {msg.decode_instance!r} from {identity!r}")
        if shape is None:
            raise LinkRejected("no KV pool attached yet")
        try:
            max_rows = check_endpoint(msg.link, shape)
            link = open_executor_link(msg.link, self.cluster_key)
        except Exception as exc:  # a peer's endpoint: whatever it makes fail, keep the old link
            raise LinkRejected(f"link from {msg.decode_instance} not attached: {exc}") from exc
        old = self._by_decode.pop(msg.decode_instance, None)
        if old is not None:
            old.link.close()
        self._by_decode[msg.decode_instance] = _Attached(identity, link, max_rows)
        log.info("decode worker %s attached a %s link", msg.decode_instance,
                 msg.link.get("kind", "shm"))  # fmt: skip
        return link

    def for_step(self, identity: bytes, msg: AttentionStep):
        """The link to run `msg` on; the step then counts as served, whatever its outcome."""
        attached = self._by_decode.get(msg.decode_instance)
        if attached is None:
            raise LinkRejected(f"step from {msg.decode_instance}, which attached no link")
        if identity != attached.identity:
            raise LinkRejected(f"step for {msg.decode_instance}'s link from {identity!r}")
        if not attached.last_step_id < msg.step_id < MAX_STEP_ID:
            raise LinkRejected(f"step {msg.step_id} of {msg.decode_instance} is out of order "
                               f"(last served: {attached.last_step_id})")  # fmt: skip
        if len(msg.request_ids) != len(msg.positions):
            raise LinkRejected(f"step {msg.step_id}: {len(msg.request_ids)} requests, "
                               f"{len(msg.positions)} positions")  # fmt: skip
        if len(msg.request_ids) > attached.max_rows:
            raise LinkRejected(f"step {msg.step_id}: {len(msg.request_ids)} rows exceed the "
                               f"link's {attached.max_rows}")  # fmt: skip
        attached.last_step_id = msg.step_id
        return attached.link

    def check_release(self, identity: bytes, msg: ReleaseOffloaded) -> None:
        if identity != msg.decode_instance.encode():
            raise LinkRejected(f"release for {msg.decode_instance!r} from {identity!r}")

    def close(self) -> None:
        for attached in self._by_decode.values():
            attached.link.close()
        self._by_decode.clear()
