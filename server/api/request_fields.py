"""The field types both HTTP APIs validate requests with, so whatever passes fits where it goes
next: ints into msgpack's 64 bits and the engine's int32 token ids, floats finite for the sampler.
(Strings reach the tokenizer as valid UTF-8 through `http_errors.parse_body`.)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from engine.sequence import MAX_LOGPROBS

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def request_config(extra: Literal["forbid", "ignore"]) -> ConfigDict:
    # Strict: "16" is no int and true no number. No NaN or ±inf: Python's json reads `NaN`,
    # `Infinity` and `1e999`, and a NaN temperature would sample token 0 forever.
    return ConfigDict(strict=True, allow_inf_nan=False, extra=extra)


TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
ChoiceCount = Annotated[int, Field(ge=1, le=INT32_MAX)]  # n, best_of; --max-n bounds them
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX)]  # -1 and 0 both mean off
# An unseeded request draws its seed from 63 bits too; vLLM's negative seeds are not accepted.
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
MinP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]  # presence_penalty, frequency_penalty
RepetitionPenalty = Annotated[float, Field(gt=0)]  # vLLM's: 1 is off
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]  # alternatives per token
# Token id (a JSON key, so a string) -> bias added to its logit, as OpenAI bounds it.
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float] | None:
    """`bias` keyed by int token ids; a key that is not one is a ValueError (a 400). Whether
    each id is in the vocabulary is the engine's check, which knows the model's."""
    if not bias:
        return None
    ids = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) <= INT32_MAX):
            raise ValueError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}"
            )
        ids[int(key)] = value
    return ids
