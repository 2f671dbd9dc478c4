"""Shared fixtures: one model cache for the whole test session, and the built-in SmolLM2 in it.
Where there is no CUDA device, the Triton interpreter is on for the session, so our Triton
kernels run on CPU tensors (tests/attention/test_triton_interpret.py); triton reads
TRITON_INTERPRET once, when first imported, so it is set here, before any test module loads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEFAULT_TEST_CACHE = "/tmp/adrenaline-test-cache"
# Set at import, before any test resolves a model, so `tiny`/`smollm2` land in one shared cache.
os.environ.setdefault("ADRENALINE_CACHE", DEFAULT_TEST_CACHE)


@pytest.fixture(scope="session")
def adrenaline_cache() -> Iterator[Path]:
    """`$ADRENALINE_CACHE` if set, else a fixed /tmp dir, exported so child processes share it."""
    cache = Path(os.environ.get("ADRENALINE_CACHE", DEFAULT_TEST_CACHE))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADRENALINE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def smollm2_dir(adrenaline_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, converted once per cache."""
    from engine.model_source import resolve_model

    return resolve_model("smollm2", adrenaline_cache)


@pytest.fixture(scope="session")
def smollm2_transformers(adrenaline_cache: Path):
    """transformers' own load of the SmolLM2 GGUF (float32, about 15 s): the reference to match.

    Its generation config never stops at EOS, so greedy runs compare a fixed number of tokens.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from engine.model_source import smollm2_gguf

    gguf_path = smollm2_gguf(adrenaline_cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
