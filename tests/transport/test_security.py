"""Cluster keys and hardened control sockets, in one process: key files and their errors, CURVE
pairs that talk only with the deployment's key (sync and asyncio contexts), keyless binds
beyond loopback refused, oversized frames dropped."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import zmq
import zmq.asyncio

from transport.security import (
    KEY_ENV,
    ClusterKey,
    ClusterKeyError,
    DroppedMessages,
    InsecureBindError,
    generate_cluster_key,
    load_cluster_key,
    report_handshake_failures,
    secure_client,
    secure_server,
    set_frame_limit,
    start_authenticator,
    write_cluster_key,
)

WAIT_MS = 500


def test_key_file_round_trip_and_owner_only_mode(tmp_path):
    path = tmp_path / "cluster.key"
    key = write_cluster_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = load_cluster_key(path)
    assert loaded == key and loaded.curve_public == key.curve_public
    assert key.to_text() not in repr(key)
    with pytest.raises(ClusterKeyError, match="exists"):
        write_cluster_key(path)
    assert load_cluster_key(None, env={KEY_ENV: key.to_text()}) == key
    assert load_cluster_key(None, env={}) is None


def test_key_errors_say_what_to_do(tmp_path):
    with pytest.raises(ClusterKeyError, match="adrenaline keygen --output"):
        load_cluster_key(tmp_path / "missing.key")
    loose = tmp_path / "loose.key"
    loose.write_text(generate_cluster_key())
    loose.chmod(0o644)
    with pytest.raises(ClusterKeyError, match="chmod 600"):
        load_cluster_key(loose)
    bad = tmp_path / "bad.key"
    bad.write_text("not hex at all")
    bad.chmod(0o600)
    with pytest.raises(ClusterKeyError, match="64 hex digits"):
        load_cluster_key(bad)
    with pytest.raises(ClusterKeyError, match="not a regular file"):
        load_cluster_key(tmp_path)
    with pytest.raises(ClusterKeyError, match=KEY_ENV):
        load_cluster_key(None, env={KEY_ENV: "abcd"})


def _server(
    ctx: zmq.Context, key: ClusterKey | None, max_frame: int | None = None
) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_server(sock, key, "tcp://127.0.0.1")
    if max_frame is not None:
        set_frame_limit(sock, max_frame)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _client(ctx: zmq.Context, address: str, key: ClusterKey | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, key)
    sock.connect(address)
    return sock


def test_only_holders_of_the_cluster_key_reach_a_curve_server(caplog):
    key = ClusterKey.parse(generate_cluster_key(), "test")
    wrong = ClusterKey.parse(generate_cluster_key(), "test")
    ctx = zmq.Context()
    auth = start_authenticator(ctx, key)
    server, address = _server(ctx, key)
    clients = {name: _client(ctx, address, k) for name, k in
               [("right", key), ("wrong", wrong), ("none", None)]}  # fmt: skip
    # Knows the server's public key (it is no secret) but has its own keypair: only ZAP stops it.
    public, secret = zmq.curve_keypair()
    clients["public key only"] = sneak = ctx.socket(zmq.DEALER)
    sneak.setsockopt(zmq.LINGER, 0)
    sneak.curve_serverkey, sneak.curve_publickey, sneak.curve_secretkey = (
        key.curve_public,
        public,
        secret,
    )
    sneak.connect(address)
    try:
        with caplog.at_level(logging.WARNING, logger="transport.security"):
            for name, client in clients.items():
                client.send(name.encode())
            got = []
            while server.poll(WAIT_MS):
                got.append(server.recv_multipart()[1])
        assert got == [b"right"]
        assert public.decode() in caplog.text  # the refused peer is named
    finally:
        for sock in [server, *clients.values()]:
            sock.close(0)
        auth.stop()
        ctx.term()


def test_the_asyncio_authenticator_admits_only_the_cluster_key():
    key = ClusterKey.parse(generate_cluster_key(), "test")
    wrong = ClusterKey.parse(generate_cluster_key(), "test")

    async def run() -> list[bytes]:
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, key)
        server, address = _server(ctx, key)
        plain = zmq.Context()
        clients = [_client(plain, address, k) for k in (wrong, key)]
        try:
            for i, client in enumerate(clients):
                client.send(f"client {i}".encode())
            got = []
            while await server.poll(WAIT_MS):
                got.append((await server.recv_multipart())[1])
            return got
        finally:
            for sock in [server, *clients]:
                sock.close(0)
            auth.stop()
            ctx.term()
            plain.term()

    assert asyncio.run(run()) == [b"client 1"]


def test_a_keyless_bind_beyond_loopback_is_refused():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        for address in ("tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://10.1.2.3:5557"):
            with pytest.raises(InsecureBindError, match="--cluster-key FILE"):
                secure_server(sock, None, address)
        for address in ("tcp://127.0.0.1:5557", "tcp://[::1]:5557", "tcp://localhost:1",
                        "ipc:///tmp/adrenaline.sock"):  # fmt: skip
            secure_server(sock, None, address)
    finally:
        sock.close(0)
        ctx.term()


def test_an_oversized_frame_is_dropped_with_its_sender():
    ctx = zmq.Context()
    server, address = _server(ctx, None, max_frame=1024)
    big, small = _client(ctx, address, None), _client(ctx, address, None)
    try:
        big.send(b"x" * 4096)
        assert not server.poll(WAIT_MS)
        small.send(b"fits")
        assert server.poll(WAIT_MS * 4)
        assert server.recv_multipart()[1] == b"fits"
    finally:
        for sock in (server, big, small):
            sock.close(0)
        ctx.term()


def test_dropped_messages_are_counted_but_logged_once_per_interval(caplog):
    dropped = DroppedMessages(logging.getLogger("test"), interval_s=60)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            dropped.drop("malformed", "3 bytes")
        dropped.drop("unknown identity")
    assert dropped.total == 6
    assert len(caplog.records) == 2


def test_a_client_with_the_wrong_key_is_told_why(caplog):
    key = ClusterKey.parse(generate_cluster_key(), "test")
    wrong = ClusterKey.parse(generate_cluster_key(), "test")
    ctx = zmq.Context()
    auth = start_authenticator(ctx, key)
    server, address = _server(ctx, key)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    secure_client(client, wrong)
    try:
        with caplog.at_level(logging.ERROR, logger="transport.security"):
            report_handshake_failures(client, "the test server")
            client.connect(address)
            deadline = time.monotonic() + 5
            while "check --cluster-key" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "the handshake with the test server failed: check --cluster-key" in caplog.text
    finally:
        client.close(0)
        server.close(0)
        auth.stop()
        ctx.term()
