"""Our Triton kernels without a GPU: run under TRITON_INTERPRET=1 on CPU tensors against a float64
torch reference, and compiled ahead of time for Hopper (sm_90), which needs only the ptxas that
ships with triton. The interpreter is slow (milliseconds per program), so the decode grid covers
every value of each dimension pairwise instead of the full cross product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs the triton package (pip install .[test])")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from attention import triton_decode  # noqa: E402
from attention.selector import AttentionBackendError, select_backend  # noqa: E402
from attention.triton_backend import TritonAttention  # noqa: E402
from attention.triton_decode import paged_decode_attention  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402
from transport import gpu_signal  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# H100/H200 allow 227 KiB of shared memory per block.
HOPPER_SHARED_BYTES = 227 * 1024
# Triton's own helpers (tl.zeros, tl.max) are wrapped when triton is imported: both must agree.
INTERPRETER_ON = triton_decode.INTERPRETED and isinstance(
    triton.language.zeros, InterpretedFunction
)
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER_ON,
    reason="needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py "
    "sets it where there is no CUDA device; on a GPU the gpu tests run the compiled kernels)",
)


def paged_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables): shuffled block ids and random values in unused blocks,
    so a kernel that reads the wrong block or past a sequence's end fails the comparison."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(max(blocks_per_seq), 1), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = ids[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache, v_cache, tables


def reference_decode(q, k_cache, v_cache, seq_lens: list[int], tables, scale: float):
    """[B, H, D] float64; rows of length 0 (padding) are zeros, as the kernel writes them."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, n in enumerate(seq_lens):
        if n == 0:
            continue
        blocks = tables[i, : -(-n // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, dim=1)
        values = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), keys) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values)
    return out


def lens(batch: int, longest: int, seed: int, edges: tuple[int, ...] = ()) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randint(1, longest + 1, (batch - len(edges),), generator=gen).tolist()
    return [*edges, *rest]


# (num_heads, num_kv_heads, head_dim, block_size, dtype, seq_lens): each pair of values of GQA
# group (1, 4, 8), head_dim, block_size and dtype meets in some case; batch 64 and contexts 1 and
# 4096 each appear in both dtypes, batch 1 in float32; block edges (one block, one past) and a
# padding row of length 0 ride along. Long rows split across many programs, so the merge runs.
DECODE_CASES = {
    "g1-d64-b16-f32-long": (4, 4, 64, 16, torch.float32, [4096]),
    "g1-d128-b32-bf16-batch64": (4, 4, 128, 32, torch.bfloat16, lens(64, 96, 1, (1, 31, 32, 33))),
    "g4-d64-b32-bf16-edges": (8, 2, 64, 32, torch.bfloat16, [1, 2, 2047, 4096]),
    "g4-d128-b16-f32-batch64": (8, 2, 128, 16, torch.float32, lens(64, 48, 2, (0, 1, 16, 17))),
    "g8-d64-b16-bf16-mixed": (8, 1, 64, 16, torch.bfloat16, lens(16, 4096, 3, (4096, 1))),
    "g8-d128-b32-f32-short-long": (8, 1, 128, 32, torch.float32, [1, 4096]),
}


@needs_interpreter
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_kernel_matches_torch_under_interpreter(case) -> None:
    num_heads, num_kv_heads, head_dim, block_size, dtype, seq_lens = case
    k_cache, v_cache, tables = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, 0)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    scale = head_dim**-0.5
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, lengths, tables, max(seq_lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference_decode(q, k_cache, v_cache, seq_lens, tables, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@needs_interpreter
def test_decode_kernel_takes_a_strided_query_under_interpreter() -> None:
    # q as a transposed view has a non-unit last stride; `out` must still come out contiguous.
    seq_lens = [5, 40]
    k_cache, v_cache, tables = paged_cache(seq_lens, 2, 64, 16, torch.float32, 4)
    q = torch.randn(2, 64, 8).transpose(1, 2)  # [B, H, D], stride(-1) == 8
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, lengths, tables, 40, 0.125)
    ref = reference_decode(q, k_cache, v_cache, seq_lens, tables, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_triton_backend_is_refused_on_cpu_without_interpreter(monkeypatch) -> None:
    monkeypatch.setattr(triton_decode, "INTERPRETED", False)
    with pytest.raises(AttentionBackendError, match="TRITON_INTERPRET=1"):
        select_backend("triton", torch.device("cpu"), torch.float32, 16)


@needs_interpreter
def test_tiny_model_through_triton_kernel_equals_torch_backend() -> None:
    assert select_backend("triton", torch.device("cpu"), torch.float32, 16) is TritonAttention
    # One prompt longer than two 64-key tiles, so its decode steps split the sequence.
    prompts = [[5, 9, 13], list(range(3, 40)), [(7 * i) % 380 + 3 for i in range(150)]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM("tiny", attention_backend=backend, num_blocks=64, max_model_len=256)
        assert llm.engine.runner.backend.name == backend
        tokens[backend] = [out.token_ids for out in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 10 for t in tokens["torch"])


def signal_counters() -> gpu_signal.MappedCounters:
    return gpu_signal.MappedCounters(torch.zeros(8, dtype=torch.int64))


@needs_interpreter
def test_signal_write_kernel_under_interpreter() -> None:
    counters = signal_counters()
    gpu_signal.write_value(counters, 2, 7)
    assert counters.host.tolist() == [0, 0, 7, 0, 0, 0, 0, 0]


# The wait kernel's timer is a constexpr: %globaltimer (inline PTX) compiled for a GPU, a host
# clock under the interpreter, so its wait and timeout logic runs here unchanged.
@needs_interpreter
def test_signal_wait_passes_on_a_value_already_there() -> None:
    counters = signal_counters()
    counters.host[0] = 5
    gpu_signal.wait_value(counters, 0, 5, 10**10, 3, 1)
    gpu_signal.wait_value(counters, 0, 4, 10**10, 3, 1)  # >=: an older value is passed too
    assert counters.host[3] == 0


@needs_interpreter
def test_signal_wait_times_out_and_marks_its_step_failed() -> None:
    counters = signal_counters()
    started = time.monotonic()
    gpu_signal.wait_value(counters, 0, 5, 300_000_000, 3, 8)  # 0.3 s, failing as step 7
    assert time.monotonic() - started >= 0.3
    assert counters.host.tolist() == [0, 0, 0, 8, 0, 0, 0, 0]
    # The step failed already: its later waits pass at once instead of each timing out.
    started = time.monotonic()
    gpu_signal.wait_value(counters, 0, 6, 10**10, 3, 8)
    assert time.monotonic() - started < 5


@needs_interpreter
def test_signal_wait_ends_when_the_peer_writes() -> None:
    counters = signal_counters()
    writer = threading.Timer(0.2, lambda: counters.host.__setitem__(0, 9))
    writer.start()
    started = time.monotonic()
    gpu_signal.wait_value(counters, 0, 9, 10**10, 3, 1)
    writer.join()
    assert 0.2 <= time.monotonic() - started < 5
    assert counters.host[3] == 0


@needs_interpreter
def test_exact_signal_wait_marks_a_later_request() -> None:
    counters = signal_counters()
    counters.host[0] = 12  # the peer moved on to a later step
    gpu_signal.wait_value(counters, 0, 10, 10**10, 3, 4, exact=True)
    assert counters.host[3] == 4
    counters.host[0] = 20
    gpu_signal.wait_value(counters, 0, 20, 10**10, 4, 5, exact=True)
    assert counters.host[4] == 0


@needs_interpreter
def test_signal_answer_carries_its_sides_failure() -> None:
    counters = signal_counters()
    gpu_signal.answer(counters, 1, 3, 3, 2, 2)  # not failed: only the answer
    assert counters.host.tolist()[:4] == [0, 3, 0, 0]
    counters.host[3] = 2  # step 1 failed
    gpu_signal.answer(counters, 1, 4, 3, 2, 2)
    assert counters.host.tolist()[:4] == [0, 4, 2, 2]


@needs_interpreter
def test_signal_kernels_take_the_step_numbers_from_the_sequence_base() -> None:
    """What a replayed CUDA graph does: the same launches, arguments unchanged, after the base
    advanced by a step, write, await and answer the next step's sequence numbers and tag."""
    counters, layers = signal_counters(), 3
    base = gpu_signal.SequenceBase("cpu")
    base.set(2 * layers, 3)  # step 2: layer l's number is 6 + l + 1, its failure tag 3
    gpu_signal.write_value(counters, 0, 2 * layers + 2, base)  # layer 1, as a link enqueues it
    assert counters.host[0] == 8

    def step_launches() -> None:  # layer 1's launches, as a graph would hold them
        args = counters.kernel_arg(), base.values
        gpu_signal._write_value_kernel[(1,)](args[0], 0, args[1], 2, ON_GPU=False)
        gpu_signal._wait_value_kernel[(1,)](args[0], 0, args[1], 2, 200_000_000, 3, 0,
                                            EXACT=True, ON_GPU=False,
                                            CLOCK=gpu_signal._host_clock)  # fmt: skip
        gpu_signal._answer_kernel[(1,)](args[0], 1, args[1], 2, 3, 0, 2, ON_GPU=False)

    step_launches()
    assert counters.host.tolist()[:4] == [8, 8, 0, 0]  # request, response; not failed
    base.advance(layers)
    assert (base.seq_base, base.step_tag) == (9, 4) and base.values.tolist() == [9, 4]
    step_launches()
    assert counters.host.tolist()[:4] == [11, 11, 0, 0]  # step 3's layer 1
    # The wait reads its target from the base too: step 4's, with step 3's request in place,
    # times out and marks step 4 (tag 5) failed, and the answer carries the refusal.
    base.advance(layers)
    args = counters.kernel_arg(), base.values
    gpu_signal._wait_value_kernel[(1,)](args[0], 0, args[1], 2, 200_000_000, 3, 0, EXACT=True,
                                        ON_GPU=False, CLOCK=gpu_signal._host_clock)  # fmt: skip
    gpu_signal._answer_kernel[(1,)](args[0], 1, args[1], 2, 3, 0, 2, ON_GPU=False)
    assert counters.host.tolist()[:4] == [11, 14, 5, 5]


# Compiling needs triton imported without the interpreter, so it runs in a child process.
COMPILE_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attention import triton_decode
from transport import gpu_signal

def compile_sm90(kernel, types, constexprs):
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    return {"shared": compiled.metadata.shared, "ptx": compiled.asm["ptx"]}

results = {}
for dtype, group, head_dim, block_n in json.loads(sys.argv[1]):
    types = dict(Q=dtype, K=dtype, V=dtype, Out=dtype, Mid_o="*fp32", Mid_lse="*fp32",
                 Block_tables="*i32", Seq_lens="*i32", scale_log2="fp32")
    name = f"{dtype}-{group}-{head_dim}"
    results["split_kv" + name] = compile_sm90(triton_decode._split_kv_kernel, types, dict(
        GROUP=group, BLOCK_SIZE=16, HEAD_DIM=head_dim, BLOCK_G=16, BLOCK_D=head_dim,
        BLOCK_N=block_n, DOT_IN_FP32=False))
    results["merge" + name] = compile_sm90(triton_decode._merge_splits_kernel, types,
                                           dict(HEAD_DIM=head_dim, BLOCK_D=head_dim))
types = dict(counters="*i64", base="*i64", offset="i64", timeout_ns="i64", fail_offset="i64")
results["write_value"] = compile_sm90(gpu_signal._write_value_kernel, types, dict(ON_GPU=True))
for exact in (False, True):
    results[f"wait_value-{exact}"] = compile_sm90(gpu_signal._wait_value_kernel, types, dict(
        EXACT=exact, ON_GPU=True, CLOCK=gpu_signal._globaltimer))
results["answer"] = compile_sm90(gpu_signal._answer_kernel, types, dict(ON_GPU=True))
print(json.dumps(results))
"""
# (pointer dtype, GQA group, head_dim, BLOCK_N as paged_decode_attention picks it): Llama-3-8B's
# bf16 shape, and the widest float32 tile.
HOPPER_CONFIGS = [("*bf16", 4, 128, 64), ("*fp32", 1, 256, 16)]


def test_kernels_compile_for_hopper() -> None:
    """Every kernel of ours compiles to an sm_90 cubin within Hopper's shared memory; the signal
    kernels' inline PTX (%globaltimer, system-scope acquire loads and release stores) assembles,
    and none of them needs an atomic read-modify-write (which PCIe may not carry)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER, json.dumps(HOPPER_CONFIGS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == 2 * len(HOPPER_CONFIGS) + 4
    assert all(r["shared"] <= HOPPER_SHARED_BYTES for r in results.values())
    signals = {k: r["ptx"] for k, r in results.items() if not k.startswith(("split", "merge"))}
    assert all("%globaltimer" in signals[f"wait_value-{exact}"] for exact in (False, True))
    assert all("ld.acquire.sys.global.b64" in signals[f"wait_value-{e}"] for e in (False, True))
    assert all("st.release.sys.global.b64" in signals[k] for k in ("write_value", "answer"))
    assert not any("atom." in ptx for ptx in signals.values())
