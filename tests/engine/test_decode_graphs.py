"""Decode steps padded to a CUDA graph's batch-size bucket, on the tiny model: the same greedy
tokens as unpadded steps and logits and KV equal to float32 rounding, padding rows writing nothing
into real KV blocks, with local and offloaded rows; the buckets, the max_seq_len guard and the KV
budget arithmetic. On a GPU: captured graphs replay to the tokens of eager steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_offloaded_recompute import offloaded_run

from engine.decode_graphs import DecodeGraphs, graph_batch_sizes
from engine.kv_budget import kv_block_bytes, kv_pool_budget, num_kv_blocks
from engine.llm import LLM
from engine.sequence import SamplingParams
from engine.step_inputs import ContextLengthError, HostStep, dummy_prefill, padding_step

KWARGS = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=16)
# Nine prompts of different lengths, finishing one after another: decode batches of 9 down to 1.
PROMPTS = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(9)]
PARAMS = [SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(9)]
GIB = 1 << 30
# float32 rounding carried through the tiny model's layers; a padding row leaking moves values ~1
ROUNDING = dict(rtol=1e-4, atol=1e-4)


def test_buckets_hold_every_batch_size_in_the_smallest_fitting_size() -> None:
    assert graph_batch_sizes(64) == [1, 2, 4, 8, *range(16, 65, 8)]
    assert graph_batch_sizes(3) == [1, 2, 4] and graph_batch_sizes(9) == [1, 2, 4, 8, 16]
    for max_num_seqs in (1, 5, 8, 20, 61):
        sizes = graph_batch_sizes(max_num_seqs)
        graphs = DecodeGraphs(max_num_seqs, 64, 16, 0, 8, torch.float32, torch.device("cpu"))
        for rows in range(1, max_num_seqs + 1):
            bucket = graphs.bucket(rows)
            assert bucket in sizes and bucket >= rows
            assert all(size < rows for size in sizes if size < bucket)
        assert graphs.bucket(sizes[-1] + 1) is None


def generate(pad: bool, llm_kwargs: dict = KWARGS):
    """Tokens, each step's sampled logits rows in sequence order, the real KV blocks after, and
    (real rows, padded rows) of every decode step."""
    llm = LLM("tiny", pad_decode=pad, **llm_kwargs)
    runner = llm.engine.runner
    logits_rows, steps, prepare, logits = [], [], runner._prepare, runner.model.logits

    def prepare_and_note(batch):
        layout, step, padded, sampling = prepare(batch)
        if not step.num_prefills:
            steps.append((len(layout.seqs), step.num_tokens))
        order = [seq.request_id for seq in sampling]
        runner.model.logits = lambda hidden: note(logits(hidden), order)
        return layout, step, padded, sampling

    def note(out: torch.Tensor, order: list[str]) -> torch.Tensor:
        logits_rows.append({rid: out[i].clone() for i, rid in enumerate(order)})
        return out

    runner._prepare = prepare_and_note
    tokens = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0
    return tokens, logits_rows, runner.kv_pool[:, :, : runner.num_blocks].clone(), steps


@pytest.fixture(scope="module")
def unpadded():
    return generate(pad=False)


def test_padded_decode_steps_give_the_same_tokens_logits_and_kv(unpadded) -> None:
    tokens, logits, kv, steps = generate(pad=True)
    ref_tokens, ref_logits, ref_kv, ref_steps = unpadded
    assert tokens == ref_tokens
    # Real rows 9, 5, 3 and 1 ran padded to buckets 16, 8, 4 and 1; unpadded runs were not.
    assert {1, 3, 5, 9} <= {rows for rows, _ in steps}
    assert all(padded in graph_batch_sizes(16) for _, padded in steps)
    assert (9, 16) in steps and (5, 8) in steps and (3, 4) in steps and (1, 1) in steps
    assert all(rows == n for rows, n in ref_steps)
    # Not bit-equal: a GEMM's kernel, and so its summation order, may depend on its row count
    # (CI's CPU gave one logit 9.8526e-01 padded, 9.8527e-01 not). A padding row leaking into a
    # real row would move it by far more than float32 rounding.
    assert len(logits) == len(ref_logits)
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
        assert ours.keys() == theirs.keys()
        for rid in ours:
            torch.testing.assert_close(
                ours[rid],
                theirs[rid],
                **ROUNDING,
                msg=lambda m, at=f"step {step}, {rid}": f"{at}: {m}",
            )
    torch.testing.assert_close(kv, ref_kv, **ROUNDING)


def test_padding_rows_write_only_the_padding_block() -> None:
    llm = LLM("tiny", pad_decode=True, **KWARGS)
    runner = llm.engine.runner
    forward, padded_steps = runner._forward_decode, []

    def checked(layout, step):
        before = runner.kv_pool.clone()
        hidden = forward(layout, step)
        # [num_blocks + 1, block_size]: which slots of any layer's k or v changed
        changed = (runner.kv_pool != before).flatten(4).any(-1).any(0).any(0)
        slots = set(np.flatnonzero(changed[: runner.num_blocks].flatten().numpy()).tolist())
        real = set(step.slot_mapping[: layout.num_local].tolist())
        assert slots <= real and len(slots) == len(real)  # each real row wrote its own slot
        assert step.slot_mapping[layout.num_local :].tolist() == [
            runner.pad_block * runner.block_size
        ] * (step.num_local_tokens - layout.num_local)
        padded_steps.append(step.num_tokens - len(layout.seqs))
        return hidden

    runner._forward_decode = checked
    llm.generate(PROMPTS[:6], PARAMS[:6])
    assert runner.kv_pool.shape[2] == runner.num_blocks + 1
    assert sum(padded_steps) > 0 and llm.engine.stats()["num_blocks"] == KWARGS["num_blocks"]


def graphed_run(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """offloaded_run with decode steps through the CPU's graph stand-in, offloaded ones too
    (a graph-safe remote); every replay checked."""
    replays = []

    def use_graphs(decode, remote) -> None:
        decode.runner.use_graphs = remote.graph_safe = True
        replay = decode.runner.decode_graphs.replay

        def noted_replay(key, forward):
            hidden = replay(key, forward)
            replays.append((key, hidden is not None))
            return hidden

        decode.runner.decode_graphs.replay = noted_replay

    tokens, decode, remote = offloaded_run(prompts, params, prepare=use_graphs, pad_decode=True)
    offloaded = [key for key, ran in replays if ran and key[2]]
    # Every replay of a step with offloaded rows was checked once, after it ran.
    assert offloaded and remote.replayed == len(offloaded)
    assert all(key[3] == remote.links_generation for key in offloaded)
    # Each shape was captured on its second step, so one step per key ran eagerly.
    assert set(decode.runner.decode_graphs.graphs) <= decode.runner.decode_graphs.seen
    assert len(replays) == sum(ran for _, ran in replays)
    return tokens


def test_graphed_steps_with_offloaded_rows_give_local_tokens() -> None:
    # Mixed local + offloaded steps through graphs (the CPU stand-in replays eagerly): a key is
    # (bucket, local rows, rows per executor, links generation); a replayed step is checked
    # by replayed(), not by its last layer's receive.
    prompts, params = PROMPTS[1:6], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    local = [o.token_ids for o in LLM("tiny", **KWARGS).generate(prompts, params)]
    assert graphed_run(prompts, params) == local


def test_graphs_over_replaced_links_are_dropped() -> None:
    graphs = DecodeGraphs(8, 64, 16, 0, 8, torch.float32, torch.device("cpu"))
    local, old = (4, 4, (), 0), (4, 2, (("attention-0", 2),), 1)
    for key in (local, old):
        graphs.capture(key, lambda: torch.zeros(4, 8), warm_up=False)
        graphs.seen.add(key)
    graphs.links_changed(1)
    assert set(graphs.graphs) == {local, old}
    graphs.links_changed(2)  # a link was replaced: graphs posting to the old buffers go
    assert set(graphs.graphs) == {local} and graphs.seen == {local}


def test_padded_steps_with_offloaded_rows_give_local_tokens() -> None:
    # Three rows, one offloaded: padded to 4 with the padding row before the offloaded one.
    prompts, params = PROMPTS[1:4], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    local = [o.token_ids for o in LLM("tiny", **KWARGS).generate(prompts, params)]
    assert offloaded_run(prompts, params, pad_decode=True)[0] == local


def decode_step(seq_lens: list[int], block_size: int = 16) -> HostStep:
    width = -(-max(seq_lens) // block_size)
    tables = np.arange(len(seq_lens) * width, dtype=np.int32).reshape(len(seq_lens), width)
    n = len(seq_lens)
    last = np.array(seq_lens) - 1
    return HostStep(
        token_ids=np.zeros(n, np.int64),
        positions=last.astype(np.int64),
        slot_mapping=(
            tables[np.arange(n), last // block_size] * block_size + last % block_size
        ).astype(np.int64),  # fmt: skip
        query_lens=np.zeros(0, np.int32),
        prefill_seq_lens=np.zeros(0, np.int32),
        block_tables=tables,
        decode_seq_lens=np.array(seq_lens, np.int32),
        sample_tokens=np.arange(n, dtype=np.int64),
    )


def test_a_context_longer_than_max_seq_len_is_refused() -> None:
    graphs = DecodeGraphs(4, 64, 16, 40, 8, torch.float32, torch.device("cpu"))
    graphs.load(decode_step([64, 3]), max_seq_len=64)  # exactly max_seq_len fits
    with pytest.raises(ContextLengthError, match="70 tokens.*max_seq_len 64"):
        graphs.load(decode_step([70, 3]), max_seq_len=64)
    # Through the runner's eager metadata: a block table too short for its sequence.
    runner = LLM("tiny", **KWARGS).engine.runner
    step = decode_step([20, 40])
    step.block_tables = step.block_tables[:, :2]
    with pytest.raises(ContextLengthError, match="block tables of 32 tokens"):
        runner._metadata(step)


def test_kv_budget_reserves_activations_and_graphs() -> None:
    budget = kv_pool_budget(80 * GIB, 20 * GIB, 0.9, 3 * GIB, 1 * GIB)
    assert budget == int(80 * GIB * 0.9) - 24 * GIB
    assert kv_pool_budget(80 * GIB, 20 * GIB, 0.9, 0) - budget == 4 * GIB
    block = 1 << 20
    assert num_kv_blocks(budget, block, torch.device("cuda")) == budget // block
    for too_little in (block - 1, 0, kv_pool_budget(16 * GIB, 15 * GIB, 0.9, GIB)):
        with pytest.raises(MemoryError, match="--gpu-memory-utilization"):
            num_kv_blocks(too_little, block, torch.device("cuda"))


def test_cpu_pool_is_sized_from_cpu_kv_cache_gib() -> None:
    llm = LLM("tiny", cpu_kv_cache_gib=0.01, max_model_len=256)
    runner = llm.engine.runner
    block = kv_block_bytes(runner.model_config, runner.block_size, runner.dtype)
    assert runner.num_blocks == int(0.01 * GIB) // block == runner.kv_pool.shape[2]


@torch.inference_mode()
def test_profiling_steps_run_on_the_model() -> None:
    """The dummy steps the CUDA profiling pass runs: a full token budget of prompts, each at
    most max_model_len, and the largest decode bucket of padding rows, run eagerly here."""
    runner = LLM("tiny", pad_decode=True, **KWARGS).engine.runner
    prefill = dummy_prefill(600, 256, 16)
    assert prefill.query_lens.tolist() == [256, 256, 88]
    assert len(set(prefill.slot_mapping.tolist())) == 600
    pool = torch.zeros(runner._pool_shape(int(prefill.block_tables.max()) + 1))
    assert runner._eager(prefill, pool).shape == (600, runner.model_config.hidden_size)
    graphs = runner._decode_graphs(pad_block=0)  # over the scratch pool, as the profiler does
    inputs = graphs.load(padding_step(16, 0, 16), max_seq_len=256)
    hidden = runner.model(*inputs[:2], pool, inputs[2], runner.backend)
    assert hidden.shape == (16, runner.model_config.hidden_size) and hidden.isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_replays_give_eager_tokens() -> None:
    kwargs = dict(KWARGS, device="cuda", dtype="bfloat16")
    eager = LLM("tiny", enforce_eager=True, **kwargs)
    graphs = LLM("tiny", **kwargs)
    assert eager.engine.runner.decode_graphs is None
    assert len(graphs.engine.runner.decode_graphs.graphs) == len(graph_batch_sizes(16))
    assert [o.token_ids for o in graphs.generate(PROMPTS, PARAMS)] == [
        o.token_ids for o in eager.generate(PROMPTS, PARAMS)
    ]


@pytest.mark.parametrize("role", ["serve", "prefill", "decode"])
def test_enforce_eager_reaches_every_role_config(role: str) -> None:
    from server.cli import build_parser, engine_config_from_args
    from server.launch.serve import argv_for_groups

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[role]
    for argv, eager in (([], False), (["--enforce-eager"], True)):
        args = parser.parse_args([role, *argv])
        assert engine_config_from_args(args, sub).enforce_eager is eager
        # `serve` hands its engine flags on to the worker processes it starts.
        assert ("--enforce-eager" in argv_for_groups(sub, {"engine"}, args)) is eager
