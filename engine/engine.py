"""The engine loop of one worker: requests in, a step of batching + model + sampling, outputs out.

Synchronous and single-threaded; the server and the offline `LLM` drive it by calling `step()`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attention.remote import RemoteAttention, RemoteAttentionError
from engine.batcher import Batcher
from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.model_source import resolve_model
from engine.runner import KVPoolFactory, ModelRunner
from engine.sequence import (
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    Sequence,
    SequenceStatus,
)
from engine.step_timing import StepTiming
from engine.structured_output import GrammarCache
from engine.tokenizer import Tokenizer, detokenize, find_stop, partial_stop_len

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handoff:
    """Where a prefill worker stopped: what another worker needs to continue exactly. The
    sampler's random stream follows from the seed in `params` and the number of outputs."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far; the last one's KV is not computed yet
    output_logprobs: list[float] | None
    params: SamplingParams
    text_sent: int  # characters of output text already reported


@dataclass(frozen=True)
class Resume:
    """A request continued from tokens generated elsewhere (a migrated request): prefill
    computes the KV of prompt + outputs and samples the next token."""

    output_token_ids: list[int]
    output_logprobs: list[float] | None
    text_sent: int


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all output tokens so far
    text: str  # all output text so far (stop strings cut off)
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[float] | None = None
    # With top_logprobs: the best alternatives of each token in `logprobs`' tail (all of them
    # offline; a request continued from elsewhere has only those sampled here).
    top_logprobs: list | None = None
    # With prompt_logprobs: per prompt token after the first, (logprob, rank, alternatives);
    # complete from the output carrying the first token on (empty for a continued request).
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    # Set when prefill stopped after the first token to hand the request to a decode worker.
    handoff: bool = False


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        kv_pool_factory: KVPoolFactory | None = None,
        remote: RemoteAttention | None = None,
    ) -> None:
        self.model_dir: Path | None = resolve_model(config.model)
        self.model_config = ModelConfig.from_model_dir(self.model_dir)
        config = self._fit_max_model_len(config)
        self.config = config
        self.tokenizer = Tokenizer(self.model_dir)
        self.remote = remote
        self.runner = ModelRunner(
            config, self.model_config, self.model_dir, kv_pool_factory, remote
        )
        if self.runner.num_blocks * config.cache.block_size < config.batch.max_model_len:
            raise ConfigError(
                f"the KV cache ({self.runner.num_blocks} blocks of {config.cache.block_size}) "
                f"cannot hold one sequence of max_model_len={config.batch.max_model_len}; "
                "lower --max-model-len or raise --num-kv-blocks"
            )
        batch = config.batch
        if not batch.enable_chunked_prefill and batch.max_num_batched_tokens < batch.max_model_len:
            raise ConfigError(
                "without chunked prefill, --max-num-batched-tokens must be at least "
                f"--max-model-len ({batch.max_model_len}) so that every prompt fits one step"
            )
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.batcher = Batcher(config.batch, self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.requests_total = 0
        self.aborts_total = 0
        self.timing = StepTiming()
        self.num_reclaimed = 0  # offloaded requests taken back from a failed executor
        self._seed_source = random.Random(config.seed)
        self.grammars = GrammarCache(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
        )

    def _fit_max_model_len(self, config: EngineConfig) -> EngineConfig:
        cfg = self.model_config
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            # Attention over a window is not implemented; within it, full attention is exact.
            limit = min(limit, cfg.sliding_window)
        if config.batch.max_model_len > limit:
            log.info("max_model_len lowered from %d to %d", config.batch.max_model_len, limit)
            return replace(config, batch=replace(config.batch, max_model_len=limit))
        return config

    @property
    def max_model_len(self) -> int:
        return self.config.batch.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        handoff: bool = False,
        resume: Resume | None = None,
    ) -> None:
        """Queues a request; with `handoff`, it stops after its next token, keeping its KV;
        with `resume`, it continues after outputs generated elsewhere."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        outputs = list(resume.output_token_ids) if resume else []
        total = len(prompt_token_ids) + len(outputs)
        if total >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {total} tokens; this model's context is "
                f"{self.max_model_len} tokens, leaving no room to generate"
            )
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids) or any(
            t < 0 or t >= vocab for t in outputs
        ):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        params.validate()
        if any(not 0 <= t < vocab for t in params.logit_bias or {}):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab})")
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.handoff = handoff
        if resume is not None:
            self._continue_from(seq, outputs, resume.output_logprobs, resume.text_sent)
        self.requests[request_id] = seq
        self.requests_total += 1
        self.batcher.add(seq)

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        seq = Sequence(request_id, prompt_token_ids, params)
        if not params.greedy:
            seq.seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
            seq.generator = torch.Generator(device=self.runner.device)
        if params.structured is not None:
            seq.grammar = self.grammars.new_state(params.structured)
        return seq

    def _continue_from(
        self, seq: Sequence, outputs: list[int], logprobs: list[float] | None, text_sent: int
    ) -> None:
        """Appends outputs already generated (and partly reported) elsewhere."""
        seq.token_ids.extend(outputs)
        if seq.params.logprobs:
            seq.output_logprobs = list(logprobs or [])
        seq.text = self.tokenizer.decode(seq.output_token_ids)
        seq.text_sent, seq.tokens_sent = min(text_sent, len(seq.text)), len(outputs)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.aborts_total += 1
        self._finish(seq, FinishReason.ABORT)
        return True

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.batcher.finish(seq, reason)
        if seq.executor and self.remote is not None:
            self.remote.release(seq.executor, seq.request_id)

    def has_unfinished(self) -> bool:
        return self.batcher.has_unfinished()

    def step(self) -> list[RequestOutput]:
        batch = self.batcher.schedule()
        if not batch:
            return []
        started = time.perf_counter()
        try:
            result = self.runner.execute(batch)
        except RemoteAttentionError as exc:
            # Nothing of this step was committed: the executor's requests are recomputed here
            # and the rest simply run again next step.
            log.warning("%s; its requests are recomputed locally", exc)
            self._reclaim_offloaded(exc.executor)
            return []
        self.timing.record_step(batch, time.perf_counter() - started)
        for seq, num_new in batch.entries:
            seq.num_computed_tokens += num_new
            if not seq.executor:
                self.block_manager.commit_computed_blocks(seq)
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs += entries
        outputs = []
        for seq, token, logprob, top in result.sampled:
            seq.append_token(token, logprob, top)
            self._check_finished(seq)
            if seq.handoff and not seq.is_finished:
                self.batcher.hold(seq)
            outputs.append(self._output(seq))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return outputs

    def _check_finished(self, seq: Sequence) -> None:
        params = seq.params
        token = seq.token_ids[-1]
        final_before = detokenize(self.tokenizer, seq)
        reason = None
        # As vLLM: before min_tokens, neither stop strings nor stop tokens end a request.
        may_stop = seq.num_output_tokens >= params.min_tokens
        stop_at = find_stop(seq.text, params.stop, final_before) if params.stop else -1
        if may_stop and stop_at != -1:
            seq.text = seq.text[:stop_at]
            reason = FinishReason.STOP
        elif may_stop and (
            token in params.stop_token_ids
            or (not params.ignore_eos and token in self.model_config.eos_token_ids)
        ):
            reason = FinishReason.STOP
        elif self._grammar_done(seq):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)

    @staticmethod
    def _grammar_done(seq: Sequence) -> bool:
        """Advances the request's matcher past its newest token; a complete grammar ends it."""
        if seq.grammar is None:
            return False
        seq.grammar.sync(seq.output_token_ids)
        return seq.grammar.done

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.is_finished
        text = seq.text
        visible = len(text)
        if not finished:
            # Hold back a partial UTF-8 character, and text that may be the start of a stop string.
            visible -= 1 if text.endswith("\ufffd") else 0
            visible -= partial_stop_len(text[:visible], seq.params.stop)
        visible = max(visible, seq.text_sent)
        new_text = text[seq.text_sent : visible]
        seq.text_sent = visible
        output_ids = seq.output_token_ids
        new_ids = output_ids[seq.tokens_sent :]
        seq.tokens_sent = len(output_ids)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=output_ids,
            text=text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs else None,
            top_logprobs=list(seq.output_top_logprobs) if seq.params.top_logprobs else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            handoff=seq.status is SequenceStatus.HELD,
        )

    # Disaggregation: the prefill side holds and releases, the decode side reserves and starts.

    def held_block_table(self, request_id: str) -> list[int]:
        seq = self.requests.get(request_id)
        if seq is None or seq.status is not SequenceStatus.HELD:
            raise KeyError(f"request {request_id!r} holds no prefilled KV here")
        return list(seq.block_table)

    def release(self, request_id: str) -> None:
        """Frees a held request's KV once a decode worker has its copy."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.batcher.finish(seq, FinishReason.STOP)

    def reserve_prefilled(self, request_id: str, handoff: Handoff) -> list[int]:
        """Reserves fresh blocks for a request prefilled elsewhere; returns its block table."""
        return self._reserve(request_id, handoff, use_prefix_cache=False)[0]

    def reserve_prefilled_sharing(self, request_id: str, handoff: Handoff) -> tuple[list[int], int]:
        """As reserve_prefilled, but the leading full blocks this worker already holds for the
        same tokens (another choice of an n > 1 request, an earlier turn) are shared, not
        copied again: returns (block table, how many leading blocks need no copy). Only fresh
        blocks receive KV, so no shared block is ever written."""
        return self._reserve(request_id, handoff, use_prefix_cache=True)

    def _reserve(
        self, request_id: str, handoff: Handoff, use_prefix_cache: bool
    ) -> tuple[list[int], int]:
        seq = self._continued(request_id, handoff)
        if not self.block_manager.can_allocate(seq, use_prefix_cache):
            raise OutOfBlocksError(f"no free KV blocks for {request_id} on this decode worker")
        self.block_manager.allocate(seq, use_prefix_cache)
        seq.status = SequenceStatus.RESERVED
        self.requests[request_id] = seq
        self.requests_total += 1
        return list(seq.block_table), seq.num_cached_prompt_tokens // self.block_manager.block_size

    def start_prefilled(self, request_id: str) -> None:
        """The reserved request's prompt KV has arrived: decode it from the next step on."""
        seq = self.requests[request_id]
        assert seq.status is SequenceStatus.RESERVED, seq.status
        seq.num_computed_tokens = seq.num_tokens - 1  # all but the newest token's KV arrived
        self.block_manager.commit_computed_blocks(seq)
        self.batcher.add_prefilled(seq)

    def start_offloaded(self, request_id: str, handoff: Handoff, executor: str) -> None:
        """Decodes a request whose KV an attention executor holds; no block is reserved here."""
        seq = self._continued(request_id, handoff)
        seq.executor = executor
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RESERVED
        self.requests[request_id] = seq
        self.requests_total += 1
        self.batcher.add_prefilled(seq)

    def _continued(self, request_id: str, handoff: Handoff) -> Sequence:
        """A sequence picking up where a prefill worker stopped: its outputs sampled (and
        partly reported), its random stream continuing from its seed."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not handoff.output_token_ids:
            raise InvalidRequestError(f"{request_id}: a hand-off carries at least one token")
        seq = self._new_sequence(request_id, handoff.prompt_token_ids, handoff.params)
        self._continue_from(
            seq, handoff.output_token_ids, handoff.output_logprobs, handoff.text_sent
        )
        return seq

    def _reclaim_offloaded(self, executor: str) -> None:
        """Takes back the requests whose KV an executor held (it died or ran out of room): they
        keep their tokens and sampler state and are prefilled again on this worker."""
        for seq in list(self.requests.values()):
            if seq.executor != executor or seq.status is SequenceStatus.FINISHED:
                continue
            if self.remote is not None:
                self.remote.release(executor, seq.request_id)
            seq.executor = ""
            self.batcher.recompute(seq)
            self.num_reclaimed += 1

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "queued_tokens": sum(s.num_uncomputed_tokens for s in self.batcher.waiting)
            + sum(s.num_uncomputed_tokens for s in self.batcher.running),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "block_size": bm.block_size,
            "num_running": len(self.batcher.running),
            "num_waiting": len(self.batcher.waiting),
            "num_preemptions": self.batcher.num_preemptions,
            "requests_total": self.requests_total,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_queries": bm.prefix_queries,
            "num_offloaded": sum(1 for s in self.batcher.running if s.executor),
            "context_tokens": sum(
                s.num_computed_tokens for s in self.batcher.running if not s.executor
            ),
            "aborts_total": self.aborts_total,
            "num_reclaimed": self.num_reclaimed,
            **self.timing.as_dict(),
        }
