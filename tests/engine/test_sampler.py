"""Sampler: greedy, top-k / top-p / min-p filters, seeded draws independent of batch mates,
the temperature-scaled distribution, and logprobs of the raw distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import apply_filters, sample
from engine.sequence import SamplingParams

VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n draws from one [vocab] row, all from one generator."""
    generator = seeded(seed)
    return [sample(logits[None], [params], [generator])[0][0] for _ in range(n)]


def test_greedy_is_argmax() -> None:
    logits = random_logits(6)
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0)] * 6, [None] * 6)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs is None


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy(temperature: float) -> None:
    logits = random_logits(8, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    generators = [seeded(i) for i in range(8)]
    for _ in range(5):
        tokens, _ = sample(logits, params, generators)
        assert tokens == logits.argmax(-1).tolist()


def test_top_k_keeps_k_largest() -> None:
    logits = random_logits(1, seed=2)[0]
    filtered = apply_filters(logits, SamplingParams(top_k=3))
    kept = torch.isfinite(filtered).nonzero().flatten()
    assert set(kept.tolist()) == set(logits.topk(3).indices.tolist())
    assert torch.equal(filtered[kept], logits[kept])


def test_tiny_top_p_keeps_only_top_token() -> None:
    logits = random_logits(1, seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=1e-6)
    filtered = apply_filters(logits, params)
    assert torch.isfinite(filtered).sum() == 1
    assert set(draws(logits, params, 50)) == {int(logits.argmax())}


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = {
        top_p: torch.isfinite(apply_filters(logits, SamplingParams(top_p=top_p)))
        .nonzero()
        .flatten()
        .tolist()
        for top_p in (0.4, 0.7, 0.9, 0.99)
    }
    assert kept == {0.4: [0], 0.7: [0, 1], 0.9: [0, 1, 2], 0.99: [0, 1, 2, 3]}


def test_min_p_filters_relative_to_top_probability() -> None:
    probs = torch.tensor([0.4, 0.25, 0.19, 0.1, 0.06])
    params = SamplingParams(temperature=1.0, min_p=0.5)  # keep p >= 0.2
    filtered = apply_filters(probs.log(), params)
    assert torch.isfinite(filtered).tolist() == [True, True, False, False, False]
    assert set(draws(probs.log(), params, 200)) == {0, 1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = random_logits(1, seed=4)[0]
    params = SamplingParams(temperature=1.5, seed=123)
    first = draws(logits, params, 30, seed=123)
    assert draws(logits, params, 30, seed=123) == first
    assert draws(logits, params, 30, seed=124) != first


def test_seeded_sampling_ignores_batch_mates() -> None:
    logits = random_logits(4, seed=5)
    target = SamplingParams(temperature=1.0, top_p=0.9)
    alone_gen = seeded(99)
    alone = [sample(logits[2:3], [target], [alone_gen])[0][0] for _ in range(30)]
    mates = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0),
        target,
        SamplingParams(temperature=2.0, top_k=5),
    ]
    generators = [seeded(1), None, seeded(99), seeded(2)]
    batched = [sample(logits, mates, generators)[0][2] for _ in range(30)]
    assert batched == alone
    assert len(set(alone)) > 1  # really sampled, not collapsed onto one token


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_temperature_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 8000
    counts = torch.bincount(
        torch.tensor(draws(logits, SamplingParams(temperature=temperature), n, seed=7)),
        minlength=5,
    ).double()
    expected = (logits / temperature).double().softmax(-1) * n
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5; a wrong temperature gives hundreds.
    assert chi_square < 25.0, (counts.tolist(), expected.tolist())


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = random_logits(3, seed=6)
    params = [
        SamplingParams(temperature=0, logprobs=True),
        SamplingParams(temperature=0.7, top_k=5, logprobs=True),
        SamplingParams(temperature=1.0, min_p=0.1),
    ]
    tokens, logprobs = sample(logits, params, [None, seeded(1), seeded(2)])
    assert logprobs is not None and len(logprobs) == 3
    reference = torch.log_softmax(logits, -1)
    for row in range(3):
        assert math.isclose(logprobs[row], float(reference[row, tokens[row]]), abs_tol=1e-5)
        assert logprobs[row] <= 0


def test_batched_rows_draw_what_each_row_draws_alone() -> None:
    logits = random_logits(24, seed=8)
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.7),
        SamplingParams(temperature=1.0, top_k=7),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.05),
    ]
    params = [kinds[i % len(kinds)] for i in range(24)]

    def generators() -> list[torch.Generator | None]:
        return [None if p.greedy else seeded(1000 + i) for i, p in enumerate(params)]

    batch_gens, alone_gens = generators(), generators()
    for _ in range(10):
        batched, _ = sample(logits, params, batch_gens)
        alone = [sample(logits[i : i + 1], [params[i]], [alone_gens[i]])[0][0] for i in range(24)]
        assert batched == alone
