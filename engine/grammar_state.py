"""A request's grammar as the engine's plain request types hold it: what its output must follow
(`GrammarSpec`) and one sequence's matcher (`GrammarState`). Apart from the compiler
(engine/structured_output.py), so that engine/sequence.py can name them without importing it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)


class GrammarSpec(Protocol):
    """What a request's output must follow: transport's StructuredSpec, or StructuredOutput."""

    @property
    def kind(self) -> str: ...

    @property
    def spec(self) -> str: ...


class GrammarState:
    """One sequence's matcher and how many of its output tokens it has accepted."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher
        self.num_accepted = 0
        self.rejected = False

    def sync(self, output_token_ids: list[int]) -> None:
        """Accepts the outputs it has not seen: the newest token, or on a worker that picked the
        request up (hand-off, migration), every token generated before."""
        for token in output_token_ids[self.num_accepted :]:
            if self.rejected or self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token):
                self.rejected = True
                log.warning("a sampled token (%d) is outside its request's grammar", token)
        self.num_accepted = len(output_token_ids)

    @property
    def done(self) -> bool:
        """The grammar is complete (it accepted a stop token) or cannot go on."""
        return self.rejected or self.matcher.is_terminated()
