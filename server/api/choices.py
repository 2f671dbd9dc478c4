"""`n > 1` and `best_of` for the OpenAI routes, as vLLM serves them: one request fans out into a
child request per sampled sequence, and the children's outputs merge back into one answer, or
one event stream whose chunks carry their choice's index.

Child i samples with seed + i when the request has a seed (vLLM's rule), so choice i equals a
single request with that seed; an unseeded child gets a random seed of its own from the router.
Child 0 starts alone and the others once its prompt is prefilled, so on its prefill worker they
find the prompt's full blocks in the prefix cache and compute only the rest. With best_of the
children sample best_of sequences and the n with the highest cumulative logprob are returned.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import msgspec
from fastapi import Request
from pydantic import BaseModel

from engine.sequence import InvalidRequestError
from server.api.openai_format import completion, sse
from server.api.openai_reply import Reply
from server.api.openai_schemas import ChatCompletionChunk, SamplingRequest, Usage
from server.api.streaming import watched
from server.router.generation import GenerationBackend
from transport.messages import SamplingSpec, TokenOutput

DEFAULT_MAX_N = 16
SEED_SPACE = 2**63  # seeds are 63-bit (server.api.request_fields.Seed); seed + i wraps within them

T = TypeVar("T")
Answer = TypeVar("Answer", bound=BaseModel)


def check_choices(body: SamplingRequest, max_n: int) -> None:
    """A 400 for more choices than the router's --max-n allows (n and best_of)."""
    for name, value in (("n", body.n), ("best_of", body.candidates)):
        if value > max_n:
            raise InvalidRequestError(
                f"{name}={value} is above this server's limit of {max_n} choices per request "
                "(--max-n); ask for fewer"
            )


def child_sampling(sampling: SamplingSpec, index: int, ranked: bool) -> SamplingSpec:
    """Child `index`'s sampling: its own seed, and logprobs when best_of ranks by them."""
    seed = None if sampling.seed is None else (sampling.seed + index) % SEED_SPACE
    return msgspec.structs.replace(sampling, seed=seed, logprobs=sampling.logprobs or ranked)


def choice_reply(reply: Reply, index: int) -> Reply:
    """A child's running totals: the request's identity, with what `Reply.add` accumulates
    fresh. The request's usage comes once, summed over its choices, not per choice."""
    child = copy.copy(reply)
    child.text, child.token_ids, child.token_logprobs, child.token_top = "", [], [], []
    child.finish_reason, child.prompt = None, None
    child.index, child.include_usage = index, False
    return child


def cumulative_logprob(reply: Reply) -> float:
    return sum(lp for lp in reply.token_logprobs if lp is not None)


def summed_usage(reply: Reply, choices: list[Reply]) -> Usage:
    """As vLLM: the prompt counted once, the completion tokens of every returned choice."""
    done = sum(len(c.token_ids) for c in choices)
    return Usage(
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=done,
        total_tokens=reply.prompt_tokens + done,
    )


def completion_usage_chunk(reply: Reply, usage: Usage) -> str:
    return sse(completion(reply, [], usage))


def chat_usage_chunk(reply: Reply, usage: Usage) -> str:
    chunk = ChatCompletionChunk(
        id=reply.id, created=reply.created, model=reply.model, choices=[], usage=usage
    )
    return sse(chunk)


class Choices:
    """The children of one request, each read by a task of its own into a queue, so that
    closing them is a plain cancel() that no cancellation of the HTTP handler can interrupt
    (cancelling a child's task aborts it everywhere it runs)."""

    def __init__(
        self,
        backend: GenerationBackend,
        reply: Reply,
        prompt: list[int],
        sampling: SamplingSpec,
        candidates: int,
        n: int,
    ) -> None:
        self.backend, self.reply, self.prompt, self.n = backend, reply, prompt, n
        self.specs = [child_sampling(sampling, i, candidates > n) for i in range(candidates)]
        self.replies = [choice_reply(reply, i) for i in range(candidates)]
        # Per child: its outputs, then None at its end or the exception it failed with.
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(candidates)]
        self.firsts: list[asyncio.Future] = []  # done once the child has given anything
        # Done once child 0 has a second output (or ended): it is then decoding, so its prompt
        # KV is in its decode worker's prefix cache too (the hand-off committed it).
        self.first_decoding: asyncio.Future | None = None
        self.tasks: list[asyncio.Task] = []

    async def start(self, request: Request) -> None:
        """Starts every child and awaits each one's first output, so that a refusal becomes an
        HTTP error before any 200; a client that leaves meanwhile aborts them all."""
        starting = watched(request, _once(self._start_all()))
        try:
            await anext(starting)
        except BaseException:
            self.close()
            raise
        finally:
            await starting.aclose()  # type: ignore[attr-defined]

    async def _start_all(self) -> None:
        # Child 0 alone first: once its first token is out, its prompt's full blocks are in its
        # prefill worker's prefix cache, where the others find them if placed there too;
        # admitted in one step with it, they would each prefill the whole prompt. Once it is
        # decoding, a decode worker holds those blocks as well, and the others' hand-offs to it
        # share them instead of copying the prompt again (engine.reserve_prefilled_sharing):
        # one decode step of latency for the later choices, the prompt's KV held once.
        self.first_decoding = asyncio.get_running_loop().create_future()
        await self._spawn(0)
        await asyncio.shield(self.first_decoding)
        for index in range(1, len(self.specs)):
            self._spawn(index)
        for first in self.firsts:
            await first

    def _spawn(self, index: int) -> asyncio.Future:
        self.firsts.append(asyncio.get_running_loop().create_future())
        self.tasks.append(asyncio.create_task(self._run(index), name=f"{self.reply.id}-{index}"))
        return self.firsts[index]

    async def _run(self, index: int) -> None:
        queue, first = self.queues[index], self.firsts[index]
        # The later choices go where the first one's prompt KV is cached (prefix affinity).
        near = f"{self.reply.id}-0" if index else None
        stream = self.backend.generate(
            f"{self.reply.id}-{index}", self.prompt, self.specs[index], near=near
        )
        outputs = 0
        try:
            async for out in stream:
                queue.put_nowait(out)
                outputs += 1
                if not first.done():
                    first.set_result(None)
                if index == 0 and outputs == 2:
                    self._first_is_decoding()
            if not first.done():
                first.set_exception(RuntimeError(f"choice {index} ended without any output"))
            queue.put_nowait(None)
        except Exception as exc:  # the request's failure, raised to whoever reads it
            if not first.done():
                first.set_exception(exc)
            queue.put_nowait(exc)
        finally:
            if index == 0:
                self._first_is_decoding()  # or ended: the others need wait no longer

    def _first_is_decoding(self) -> None:
        if self.first_decoding is not None and not self.first_decoding.done():
            self.first_decoding.set_result(None)

    async def _outputs(self, index: int) -> AsyncIterator[TokenOutput]:
        while (item := await self.queues[index].get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Aborts every child still running (each task's cancellation ends its request)."""
        for task in self.tasks:
            task.cancel()
        for first in self.firsts:
            if first.done() and not first.cancelled():
                first.exception()  # retrieved: a failure is raised from its queue, if read

    async def aclose(self) -> None:
        self.close()

    async def answer(self, request: Request, build: Callable[[Reply], Answer]) -> Answer:
        """The whole answer: `build`'s for each returned choice, merged into one."""
        outputs = [self._outputs(i) for i in range(len(self.specs))]
        try:
            async for index, out in watched(request, merged(outputs)):
                self.replies[index].add(out)
        finally:
            self.close()
        chosen = self._chosen()
        answers = [build(r) for r in chosen]
        choices = [c for a in answers for c in a.choices]  # type: ignore[attr-defined]
        return answers[0].model_copy(
            update={"choices": choices, "usage": summed_usage(self.reply, chosen)}
        )

    def _chosen(self) -> list[Reply]:
        """All choices in order, or for best_of the n most likely, best first (vLLM v0)."""
        if len(self.replies) == self.n:
            return self.replies
        ranked = sorted(self.replies, key=cumulative_logprob, reverse=True)[: self.n]
        for index, reply in enumerate(ranked):
            reply.index = index
        return ranked

    async def events(
        self,
        request: Request,
        choice_events: Callable[[Reply, AsyncIterator[TokenOutput]], AsyncIterator[str]],
        usage_chunk: Callable[[Reply, Usage], str],
    ) -> AsyncIterator[str]:
        """Every choice's event chunks as they come, then the summed usage if asked for.
        However it ends, every child is closed (aborted if unfinished)."""
        streams = [choice_events(r, self._outputs(i)) for i, r in enumerate(self.replies)]
        events = watched(request, merged(streams))
        try:
            async for _, event in events:
                yield event
            if self.reply.include_usage:
                yield usage_chunk(self.reply, summed_usage(self.reply, self.replies))
        finally:
            self.close()  # first: the awaits below may be cancelled again (anyio's scopes)
            await events.aclose()  # type: ignore[attr-defined]


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of its stream, item) for every item of `streams`, as each arrives; the first
    failure is raised. Every stream not exhausted always has a read pending: however this
    ends, those reads are cancelled, which ends their streams."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, item
    finally:
        for future in pending:
            future.cancel()
            future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as lost


async def _once(work) -> AsyncIterator[bool]:
    await work
    yield True  # not None: `watched` reads None as the end of its stream
