"""Every control message between the router and the workers, in one page.

Messages are msgspec Structs encoded as msgpack with a tag naming the type; nothing that crosses
a socket is ever unpickled. Tensors never travel here: KV moves on the data plane.

A request's life (router R, prefill worker P, decode worker D, attention executor E beside P);
workers send `Register` as a heartbeat:
  R -> P  Prefill          P computes the prompt, samples the first token, holds its KV
  P -> R  TokenOutput      the first token (finished here if it already ends the request)
  R -> D  ReserveDecode    D reserves blocks for the prompt's KV
  D -> R  DecodeReserved   the block ids D reserved (or an error)
  R -> P  SendKV           P copies its blocks into D's over the data plane, then frees them
  P -> R  KVSent           the copy is complete
  R -> D  StartDecode      D starts decoding from the first token
  D -> R  TokenOutput      every later token, the last with a finish reason

An offloaded request's KV never moves: the executor E shares its prefill worker's pool, so
after the first token R sends E a ReserveDecode naming the blocks prefill wrote (lent_blocks),
then sends D a ReserveDecode naming E. D decodes it in its batch and, every step, sends E an
AttentionStep and per-layer tensors; E grows the request's KV in its own share of the pool.
When E lets go of the request it sends R OffloadReleased, and R tells P to free the lent blocks.

R believes a message about a request only from the worker it placed that request on. When one
of them dies or is stuck, R migrates the request: a new Prefill (under a new wire id) carries
the tokens generated so far, P recomputes their KV and samples the next one, and the hand-off
runs again. Sampling needs no state to move: a request's random stream is a function of its
seed and its number of output tokens. A worker told to Drain (or sent SIGTERM) reports
`draining` in its heartbeats, takes nothing new, and exits once its requests are done.
"""

from __future__ import annotations

import msgspec


class StructuredSpec(msgspec.Struct, frozen=True):
    """A grammar the output must follow (engine/structured_output.py): every worker that samples
    compiles it (cached) and replays the tokens already generated through its matcher."""

    kind: str  # "json_schema" | "json_object" | "regex" | "choice" | "grammar" | "structural_tag"
    spec: str  # a JSON schema or structural tag as JSON text, a regex, EBNF, choices as JSON


class SamplingSpec(msgspec.Struct, frozen=True):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: bool
    # Logit adjustments and alternatives, as engine.sequence.SamplingParams defines them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    structured: StructuredSpec | None = None


class PromptLogprobs(msgspec.Struct, frozen=True):
    """Per prompt token after the first: its logprob given the tokens before it, its rank in
    that distribution (1: the most likely) and the best alternatives, (token id, logprob)."""

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


class WorkerStats(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    queued_tokens: int
    num_preemptions: int
    requests_total: int
    # Load and timing, for placement, the offload policy and metrics (0 where not applicable).
    num_offloaded: int = 0  # running requests whose attention runs on an executor
    context_tokens: int = 0  # KV tokens this worker attends over per step (its own pool)
    last_batch_size: int = 0  # sequences in the last step
    last_prefill_tokens: int = 0  # prompt tokens computed in the last step
    step_time_ms: float = 0.0  # moving average of a step (decode: a decode step)
    attention_time_ms: float = 0.0  # executor: moving average of one layer's attention
    offload_roundtrip_ms: float = 0.0  # decode: moving average of a layer's executor wait
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    aborts_total: int = 0
    num_reclaimed: int = 0  # decode: offloaded requests taken back from a failed executor
    dropped_messages: int = 0  # received messages dropped (malformed, unexpected, refused)
    sm_share: float = 1.0  # executor: the share of the GPU's SMs in force (1: no limit)
    prefix_cache_hits: int = 0  # blocks found in the prefix cache (decode: not copied again)


class Progress(msgspec.Struct, frozen=True):
    """How a worker's engine loop is doing, apart from whether its process is alive: a slow
    step is progress, a step that never ends is not."""

    steps_total: int = 0
    step_running_s: float = 0.0  # how long the step now running has taken (0: between steps)
    last_step_ms: float = 0.0


class Register(msgspec.Struct, tag=True, frozen=True):
    """Sent on start and then as the heartbeat, so a restarted router relearns its workers.
    Heartbeats come from a thread of their own: a long step never silences them."""

    role: str  # "prefill" | "decode"
    instance: str
    pid: int
    model: str
    max_model_len: int
    # Where a prefill worker reaches this worker's KV pool (see transport.kv_transfer): a decode
    # worker's pool, or an attention executor's offload pool.
    kv_endpoint: dict[str, str | int]
    stats: WorkerStats
    # Attention executors only: the prefill worker it shares a device with, and the ZeroMQ
    # address decode workers send step plans to.
    colocated_with: str = ""
    attention_address: str = ""
    progress: Progress = Progress()
    draining: bool = False  # finishing its requests before it exits: place nothing new here
    # Where the process runs (host name and boot id), so a router on the same host can tell
    # within a heartbeat that its pid has exited.
    host: str = ""
    # The UUID of the GPU it runs on ("" on CPU): peers choose CUDA IPC or NCCL by it
    # (transport.link_choice).
    gpu_uuid: str = ""


class Prefill(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    # A migrated request continues after the tokens it already generated elsewhere: prefill
    # computes the KV of prompt + outputs and samples the next token.
    output_token_ids: list[int] = []
    output_logprobs: list[float] | None = None
    text_sent: int = 0  # characters of output text the client already has


class TokenOutput(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    token_ids: list[int]  # new tokens since the last output
    text: str  # new text since the last output
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] | None = None  # of the new tokens
    prompt_tokens: int = 0
    # With sampling.top_logprobs: each new token's best alternatives, (token id, logprob).
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # With sampling.prompt_logprobs: on the output carrying the first token only.
    prompt_logprobs: PromptLogprobs | None = None
    # Set on a prefill worker's first token when its KV waits for a decode worker: what that
    # worker needs to continue exactly where prefill stopped.
    handoff: bool = False
    block_table: list[int] | None = None  # the prefill worker's blocks holding the prompt KV


class ReserveDecode(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    # Every output token so far, the newest (whose KV is not computed yet) last; the random
    # stream continues from `sampling.seed` and their count.
    output_token_ids: list[int]
    output_logprobs: list[float] | None
    text_sent: int
    sampling: SamplingSpec
    prefill_instance: str
    transfer_id: int
    # Set for an offloaded request: its KV lives in this attention executor's pool, the decode
    # worker keeps none and starts at once.
    executor: str = ""
    executor_address: str = ""
    executor_gpu_uuid: str = ""  # the executor's Register.gpu_uuid: picks the link's kind
    # To the executor: the prefill worker's blocks the prompt's KV was written into. They stay
    # where prefill wrote them (the executor works on the same pool) until the executor is done.
    lent_blocks: list[int] = []


class DecodeReserved(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    block_ids: list[int]  # the blocks to copy the KV into, from the request's block first_block
    error: str | None = None
    # Leading blocks the decode worker already holds for these tokens (prefix cache): not sent.
    first_block: int = 0


class SendKV(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    decode_instance: str
    kv_endpoint: dict[str, str | int]
    dst_block_ids: list[int]
    transfer_id: int
    first_block: int = 0  # the held blocks before it are already on the decode worker


class KVSent(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    error: str | None = None


class StartDecode(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class RequestError(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    message: str
    status: int = 500


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


class Drain(msgspec.Struct, tag=True, frozen=True):
    """To a worker: finish what you have, take nothing new, then exit (as on SIGTERM)."""


class AttachPool(msgspec.Struct, tag=True, frozen=True):
    """To an attention executor: its prefill worker's KV pool, which it maps and shares."""

    kv_endpoint: dict[str, str | int]


class OffloadReleased(msgspec.Struct, tag=True, frozen=True):
    """From an attention executor: it is done with a request's blocks, lent ones included."""

    request_id: str


# Between a decode worker and an attention executor, directly (not through the router).


class AttachLink(msgspec.Struct, tag=True, frozen=True):
    """A decode worker's per-layer channel to this executor (transport.attention_channel)."""

    decode_instance: str
    link: dict[str, str | int]


class AttentionStep(msgspec.Struct, tag=True, frozen=True):
    """Sent once per decode step, ahead of it: which offloaded requests take part, in row order,
    and the position each one's new token lands at. Per layer, only tensors move."""

    decode_instance: str
    step_id: int
    request_ids: list[str]
    positions: list[int]


class ReleaseOffloaded(msgspec.Struct, tag=True, frozen=True):
    """The decode worker finished or dropped these requests: their KV may go."""

    decode_instance: str
    request_ids: list[str]


Message = (
    Register
    | Prefill
    | TokenOutput
    | ReserveDecode
    | DecodeReserved
    | SendKV
    | KVSent
    | StartDecode
    | Abort
    | RequestError
    | Shutdown
    | Drain
    | AttachPool
    | OffloadReleased
    | AttachLink
    | AttentionStep
    | ReleaseOffloaded
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)
