"""Offloaded decoding in one process: a decode engine whose offloaded rows are served by an
in-process attention executor. Tokens equal local decoding, and when the executor fails mid-way
the decode engine recomputes those requests itself and still gives the same tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from attention.executor import AttentionExecutor
from attention.remote import RemoteAttentionError
from attention.torch_backend import TorchAttention
from engine.engine import Handoff, LLMEngine
from engine.llm import LLM
from engine.sequence import SamplingParams

PROMPTS = [[5, 9, 33, 120, 7], list(range(40, 77)), [300, 301, 302] * 7, list(range(100, 132))]
PARAMS = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


class InProcessStep:
    def __init__(self, remote: InProcessRemote, n_local: int, groups, graphed: bool) -> None:
        self.num_local_tokens = n_local
        self.remote = remote
        self.graphed = graphed
        ((_, entries),) = groups
        self.ids = [r for r, _ in entries]
        self.positions = [p for _, p in entries]
        self.prepared = remote.executor.prepare(self.ids, self.positions)
        self.out = None

    def send(self, layer, q, k, v):
        self.out = self.remote.executor.attend(layer, self.prepared, q, k, v)

    def receive(self, layer):
        self.remote.layers_served += 1
        if (
            self.remote.fail_after is not None
            and self.remote.layers_served > self.remote.fail_after
        ):
            raise RemoteAttentionError("attention-0", "stopped answering")
        if layer == self.remote.executor.num_layers - 1:
            self.remote.executor.commit(self.ids, self.positions)
        return self.out

    def replayed(self) -> None:
        assert self.graphed, "replayed() is for graphed steps only"
        self.remote.replayed += 1


class InProcessRemote:
    def __init__(self, cfg, fail_after: int | None = None) -> None:
        self.backend = TorchAttention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5
        )
        self.executor: AttentionExecutor | None = None
        self.fail_after = fail_after
        self.layers_served = 0
        self.released: list[str] = []
        self.replayed = 0  # graphed steps checked after their replay
        self.links_generation = 1

    def share_pool(self, prefill_pool: torch.Tensor, extra_blocks: int) -> None:
        """The prefill worker's pool with the executor's own blocks at its tail (a copy here,
        taken after prefill; across processes the two map the same memory)."""
        tail = torch.zeros_like(prefill_pool[:, :, :extra_blocks])
        pool = torch.cat([prefill_pool, tail], dim=2)
        self.executor = AttentionExecutor(pool, self.backend, prefill_pool.shape[2], extra_blocks)

    def begin_step(self, n_local, groups, graphed=False):
        return InProcessStep(self, n_local, groups, graphed)

    def release(self, executor, request_id):
        self.released.append(request_id)
        self.executor.release(request_id)


def offloaded_run(
    prompts: list[list[int]],
    params: SamplingParams,
    fail_after: int | None = None,
    prepare: Callable[[LLMEngine, InProcessRemote], None] | None = None,
    **decode_kwargs,
) -> tuple[list[list[int]], LLMEngine, InProcessRemote]:
    """Odd requests' attention runs on an in-process executor, the others locally: the tokens in
    prompt order, the decode engine and the remote, every pool checked full after.
    `prepare(decode, remote)` runs before any step; `decode_kwargs` configure the decode LLM."""
    kwargs = dict(num_blocks=64, block_size=16, max_model_len=256)
    prefill = LLM("tiny", **kwargs).engine
    decode = LLM("tiny", **kwargs, **decode_kwargs).engine
    remote = InProcessRemote(decode.model_config, fail_after)
    decode.remote = decode.runner.remote = remote
    if prepare is not None:
        prepare(decode, remote)
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"r{i}", prompt, SamplingParams(**vars(params)), handoff=True)
    firsts = {}
    while prefill.has_unfinished():
        firsts.update((out.request_id, out) for out in prefill.step())
    remote.share_pool(prefill.runner.kv_pool, extra_blocks=32)
    for rid, out in firsts.items():
        # Odd requests are offloaded: the executor adopts their prompt KV where prefill wrote it.
        handoff = Handoff(out.prompt_token_ids, out.token_ids, None,
                          SamplingParams(**vars(params)), len(out.new_text))  # fmt: skip
        src = prefill.held_block_table(rid)
        if int(rid[1:]) % 2:
            remote.executor.adopt(rid, src, len(out.prompt_token_ids))
            decode.start_offloaded(rid, handoff, "attention-0")
        else:
            dst = decode.reserve_prefilled(rid, handoff)
            decode.runner.kv_pool[:, :, dst[: len(src)]] = prefill.runner.kv_pool[:, :, src]
            decode.start_prefilled(rid)
        prefill.release(rid)  # in-process the executor has its copy of the pool already
    results = {}
    while decode.has_unfinished():
        results.update((out.request_id, out.token_ids) for out in decode.step() if out.finished)
    stats = decode.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert remote.executor.blocks.num_free_blocks == remote.executor.blocks.num_blocks
    return [results[f"r{i}"] for i in range(len(prompts))], decode, remote


def run(fail_after: int | None):
    tokens, decode, _ = offloaded_run(PROMPTS, PARAMS, fail_after)
    return tokens, decode.stats()["num_reclaimed"]


@pytest.fixture(scope="module")
def expected():
    llm = LLM("tiny", num_blocks=64, max_model_len=256)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_offloaded_rows_give_local_tokens(expected):
    tokens, reclaimed = run(fail_after=None)
    assert tokens == expected and reclaimed == 0


@pytest.mark.parametrize("fail_after", [1, 4 * 7 + 2])
def test_failed_executor_requests_recompute_locally_to_the_same_tokens(expected, fail_after):
    tokens, reclaimed = run(fail_after)
    assert reclaimed == 2
    assert tokens == expected
