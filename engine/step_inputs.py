"""A step's inputs as host arrays: where each row's tokens sit (`StepLayout`), the flat arrays
the model and attention read (`HostStep`), and padding a decode step to a CUDA graph's batch size.

Everything here is numpy over plain ints, so the same code runs before an eager step and before
a graph replay, and can be tested without a device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain

import numpy as np

from engine.sequence import Sequence


class ContextLengthError(RuntimeError):
    """A sequence's context is longer than the step's attention metadata can address: its
    oldest keys would be dropped silently. A bug upstream (the batcher caps lengths at
    max_model_len), so the step is refused instead."""


@dataclass
class StepLayout:
    """Where each row's new tokens sit in a step's flat token list (host arrays). Rows are
    ordered prompt chunks, local decodes, then offloaded decodes."""

    seqs: list[Sequence]
    counts: np.ndarray  # [rows] new tokens of each row
    starts: np.ndarray  # [rows] position of each row's first new token
    num_local: int  # rows [0, num_local) attend here, the others on attention executors
    num_prefills: int  # rows [0, num_prefills) are prompt chunks (more than one token)

    @classmethod
    def of(cls, rows: list[tuple[Sequence, int]]) -> StepLayout:
        seqs = [seq for seq, _ in rows]
        counts = np.array([n for _, n in rows], dtype=np.int64)
        num_local = sum(1 for seq in seqs if not seq.executor)
        return cls(
            seqs=seqs,
            counts=counts,
            starts=np.array([seq.num_computed_tokens for seq in seqs], dtype=np.int64),
            num_local=num_local,
            num_prefills=int((counts[:num_local] > 1).sum()),
        )

    @property
    def ends(self) -> np.ndarray:
        return self.starts + self.counts

    @property
    def first_tokens(self) -> np.ndarray:  # [rows] index of each row's first token in the step
        return np.cumsum(self.counts) - self.counts

    @property
    def token_row(self) -> np.ndarray:  # [tokens] the row each token belongs to
        return np.repeat(np.arange(len(self.seqs)), self.counts)

    @property
    def positions(self) -> np.ndarray:  # [tokens]
        return np.arange(int(self.counts.sum())) - (self.first_tokens - self.starts)[self.token_row]

    def token_ids(self) -> np.ndarray:  # [tokens] int64
        starts, ends = self.starts.tolist(), self.ends.tolist()
        pieces = (seq.token_ids[a:b] for seq, a, b in zip(self.seqs, starts, ends))
        return np.fromiter(
            chain.from_iterable(pieces), dtype=np.int64, count=sum(self.counts.tolist())
        )

    def sample_rows(self) -> np.ndarray:
        """Rows whose next token is sampled: decodes, and prompts whose last chunk this is."""
        return np.flatnonzero(self.ends == [seq.num_tokens for seq in self.seqs])

    def offloaded_groups(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """Per executor, in row order: (request id, position of its new token)."""
        groups: dict[str, list[tuple[str, int]]] = {}
        offloaded = zip(self.seqs[self.num_local :], self.starts[self.num_local :].tolist())
        for seq, start in offloaded:
            groups.setdefault(seq.executor, []).append((seq.request_id, start))
        return list(groups.items())


@dataclass
class HostStep:
    """A step's flat inputs on the host. Tokens are [prefill chunks | local decodes | offloaded
    decodes]; only local tokens have slots and block tables."""

    token_ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens] int64
    slot_mapping: np.ndarray  # [local tokens] int64: block_id * block_size + offset
    query_lens: np.ndarray  # [P] int32, new tokens of each prompt chunk
    prefill_seq_lens: np.ndarray  # [P] int32, context + new tokens
    block_tables: np.ndarray  # [P + D, width] int32, prompt chunks' then local decodes'
    decode_seq_lens: np.ndarray  # [D] int32, including the new token
    sample_tokens: np.ndarray  # [S] int64, the tokens whose logits are sampled

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_local_tokens(self) -> int:
        return len(self.slot_mapping)

    @property
    def num_prefills(self) -> int:
        return len(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return int(max(self.prefill_seq_lens.max(initial=0), self.decode_seq_lens.max(initial=0)))


def host_step(layout: StepLayout, block_size: int) -> HostStep:
    """Work per sequence, never per token: every array is built with numpy."""
    num_local, num_prefills = layout.num_local, layout.num_prefills
    tables = pad_tables([seq.block_table for seq in layout.seqs[:num_local]])
    local = slice(0, int(layout.counts[:num_local].sum()))  # local rows' tokens come first
    positions = layout.positions
    local_positions = positions[local]
    blocks = tables[layout.token_row[local], local_positions // block_size].astype(np.int64)
    sample_rows = layout.sample_rows()
    return HostStep(
        token_ids=layout.token_ids(),
        positions=positions,
        slot_mapping=blocks * block_size + local_positions % block_size,
        query_lens=layout.counts[:num_prefills].astype(np.int32),
        prefill_seq_lens=layout.ends[:num_prefills].astype(np.int32),
        block_tables=tables,
        decode_seq_lens=layout.ends[num_prefills:num_local].astype(np.int32),
        sample_tokens=layout.first_tokens[sample_rows] + layout.counts[sample_rows] - 1,
    )


def pad_decodes(step: HostStep, rows: int, pad_block: int, block_size: int) -> HostStep:
    """The decode step padded to `rows` tokens. Padding rows go after the local decodes (before
    any offloaded ones, which executors take from the tail): each writes its k, v into slot 0 of
    `pad_block`, which no sequence owns, and attends to that one key; no padding token is ever
    sampled."""
    if step.num_prefills:
        raise ValueError("only decode steps are padded; prompt chunks run eagerly")
    pad, at = rows - step.num_tokens, step.num_local_tokens
    if pad < 0:
        raise ValueError(f"a step of {step.num_tokens} rows does not fit {rows}")
    width = max(step.block_tables.shape[1], 1)
    pad_tables_ = np.full((pad, width), pad_block, dtype=np.int32)
    block_tables = np.full((at, width), pad_block, dtype=np.int32)
    block_tables[:, : step.block_tables.shape[1]] = step.block_tables
    return replace(
        step,
        token_ids=np.insert(step.token_ids, at, np.zeros(pad, np.int64)),
        positions=np.insert(step.positions, at, np.zeros(pad, np.int64)),
        slot_mapping=np.concatenate(
            (step.slot_mapping, np.full(pad, pad_block * block_size, np.int64))
        ),
        block_tables=np.concatenate((block_tables, pad_tables_)),
        decode_seq_lens=np.concatenate((step.decode_seq_lens, np.ones(pad, np.int32))),
        sample_tokens=np.where(
            step.sample_tokens >= at, step.sample_tokens + pad, step.sample_tokens
        ),
    )


def padding_step(rows: int, pad_block: int, block_size: int) -> HostStep:
    """A decode step of padding rows only: what CUDA graphs are captured over."""
    empty = np.zeros(0, np.int64)
    no_rows = np.zeros(0, np.int32)
    step = HostStep(
        empty, empty, empty, no_rows, no_rows, np.zeros((0, 1), np.int32), no_rows, empty
    )
    return pad_decodes(step, rows, pad_block, block_size)


def check_context_lengths(step: HostStep, max_seq_len: int, block_size: int) -> None:
    """While lengths are host values: no context longer than the metadata's max_seq_len or its
    block tables' reach (defect 15: attention would silently read only the first keys)."""
    longest = step.max_seq_len
    reach = step.block_tables.shape[1] * block_size
    if longest > max_seq_len or (step.block_tables.size and longest > reach):
        raise ContextLengthError(
            f"a sequence of {longest} tokens is longer than the step's attention metadata "
            f"covers (max_seq_len {max_seq_len}, block tables of {reach} tokens); "
            "lower --max-model-len or report this bug"
        )


def dummy_prefill(num_tokens: int, max_model_len: int, block_size: int) -> HostStep:
    """Prompts of `num_tokens` tokens in all, each at most max_model_len, over consecutive
    blocks from 0: the largest step the batcher can schedule, for the memory-profiling pass."""
    lens = [max_model_len] * (num_tokens // max_model_len)
    lens += [num_tokens % max_model_len] if num_tokens % max_model_len else []
    query_lens = np.array(lens, dtype=np.int32)
    blocks = -(-query_lens // block_size)
    width = int(blocks.max())
    tables = np.arange(width)[None, :] + (np.cumsum(blocks) - blocks)[:, None]
    positions = np.concatenate([np.arange(n) for n in lens])
    rows = np.repeat(np.arange(len(lens)), lens)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    return HostStep(
        token_ids=np.zeros(num_tokens, np.int64),
        positions=positions.astype(np.int64),
        slot_mapping=slots.astype(np.int64),
        query_lens=query_lens,
        prefill_seq_lens=query_lens.copy(),
        block_tables=tables.astype(np.int32),
        decode_seq_lens=np.zeros(0, np.int32),
        sample_tokens=np.cumsum(query_lens).astype(np.int64) - 1,
    )


def pad_tables(tables: list[list[int]]) -> np.ndarray:
    """[len(tables), longest] int32, zero-padded."""
    width = max((len(t) for t in tables), default=0)
    padded = np.zeros((len(tables), width), dtype=np.int32)
    for row, table in zip(padded, tables):
        row[: len(table)] = table
    return padded


def query_starts(query_lens: np.ndarray) -> np.ndarray:
    """[len + 1] int32 cumulative counts, from 0."""
    return np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32)
