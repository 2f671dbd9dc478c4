"""A sequence's tokens never depend on its batch mates, local or offloaded.

Bitwise: the target is prefilled alone, then decodes beside three mates prefilled elsewhere;
however long the mates are, wherever the target sits, and whether the mates' attention runs
here or on an attention executor, its logits are the same bits at every step. (The CPU's GEMMs
round a row differently for a different number of rows, so bits are compared at equal batch
sizes; across batch sizes the greedy tokens are.)
"""

from __future__ import annotations

import pytest
import torch
from test_offloaded_recompute import InProcessRemote

from engine.engine import Handoff
from engine.llm import LLM
from engine.sequence import SamplingParams

TARGET = list(range(60, 97))  # 37 tokens: its last block is partly filled
TARGET_TOKENS = 12
# Mate prompts of the same total length (the same GEMM rows in their prefill), different shapes.
MATES = {
    "short-long": [[7] * 5, list(range(100, 140)), list(range(200, 290))],
    "even": [list(range(300, 345)), [9, 10, 11] * 15, list(range(150, 195))],
}
KWARGS = dict(num_blocks=96, block_size=16, max_model_len=256, max_num_seqs=16)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def record_logits(llm: LLM, request_id: str) -> list[torch.Tensor]:
    """Each step's logits row of `request_id`, captured as the runner samples."""
    runner, rows = llm.engine.runner, []
    prepare, logits = runner._prepare, runner.model.logits
    order: list = []

    def prepare_and_note(batch):
        inputs = prepare(batch)
        order[:] = [seq.request_id for seq in inputs[-1]]
        return inputs

    def logits_and_keep(hidden):
        out = logits(hidden)
        if request_id in order:
            rows.append(out[order.index(request_id)].clone())
        return out

    runner._prepare, runner.model.logits = prepare_and_note, logits_and_keep
    return rows


def decode_beside(mates: list[list[int]], offloaded: set[int], target_first: bool):
    """The target's tokens and logits, decoding beside `mates` from its second token on."""
    prefill = LLM("tiny", **KWARGS).engine
    decode_llm = LLM("tiny", **KWARGS)
    decode = decode_llm.engine
    remote = InProcessRemote(decode.model_config)
    decode.remote = decode.runner.remote = remote
    logits = record_logits(decode_llm, "target")
    if target_first:
        decode.add_request("target", TARGET, greedy(TARGET_TOKENS))
        decode.step()  # prefilled alone
    for i, prompt in enumerate(mates):
        prefill.add_request(f"m{i}", prompt, greedy(TARGET_TOKENS + 4), handoff=True)
    firsts = {out.request_id: out for out in prefill.step()}
    remote.share_pool(prefill.runner.kv_pool, extra_blocks=32)
    for i in range(len(mates)):
        out = firsts[f"m{i}"]
        handoff = Handoff(out.prompt_token_ids, out.token_ids, None, greedy(TARGET_TOKENS + 4), 0)
        src = prefill.held_block_table(out.request_id)
        if i in offloaded:
            remote.executor.adopt(out.request_id, src, len(out.prompt_token_ids))
            decode.start_offloaded(out.request_id, handoff, "attention-0")
        else:
            dst = decode.reserve_prefilled(out.request_id, handoff)
            decode.runner.kv_pool[:, :, dst[: len(src)]] = prefill.runner.kv_pool[:, :, src]
            decode.start_prefilled(out.request_id)
        prefill.release(out.request_id)
    if not target_first:
        decode.add_request("target", TARGET, greedy(TARGET_TOKENS))
    tokens = None
    while decode.has_unfinished():
        for out in decode.step():
            if out.request_id == "target" and out.finished:
                tokens = out.token_ids
    stats = decode.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0
    return tokens, logits


@pytest.fixture(scope="module")
def reference():
    return decode_beside(MATES["short-long"], offloaded=set(), target_first=True)


@pytest.mark.parametrize(
    "mates, offloaded",
    [("even", set()), ("short-long", {0, 1, 2}), ("short-long", {1}), ("even", {0, 2})],
    ids=["other-lengths", "all-offloaded", "one-offloaded", "other-lengths-two-offloaded"],
)
def test_same_logits_bits_whatever_the_mates(reference, mates, offloaded) -> None:
    tokens, logits = decode_beside(MATES[mates], offloaded, target_first=True)
    ref_tokens, ref_logits = reference
    assert tokens == ref_tokens and len(logits) == len(ref_logits) == TARGET_TOKENS
    # The first token comes from the target's own prefill; the rest from decode beside mates.
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
        assert torch.equal(ours, theirs), f"step {step}"


def test_same_greedy_tokens_alone_or_with_3_or_15_mates(reference) -> None:
    llm = LLM("tiny", **KWARGS)
    alone = llm.generate([TARGET], greedy(TARGET_TOKENS))[0].token_ids
    assert alone == reference[0]
    three = llm.generate([*MATES["short-long"], TARGET], greedy(TARGET_TOKENS))
    many = [[(7 * i + j) % 300 + 3 for j in range(5 + 13 * i)] for i in range(15)]
    fifteen = llm.generate([many[0], TARGET, *many[1:]], greedy(TARGET_TOKENS))
    assert three[-1].token_ids == alone and fifteen[1].token_ids == alone
    # Started late, while mates already decode, and with offloaded mates.
    assert decode_beside(MATES["even"], {0, 1}, target_first=False)[0] == alone
