"""The offline Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from dataclasses import replace

from engine.config import BatchConfig, CacheConfig, EngineConfig
from engine.engine import LLMEngine, RequestOutput
from engine.sequence import SamplingParams


class LLM:
    def __init__(self, model: str = "tiny", config: EngineConfig | None = None, **kwargs) -> None:
        """Keyword arguments name `EngineConfig`, `CacheConfig` or `BatchConfig` fields."""
        self.engine = LLMEngine(config or build_engine_config(model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (
            params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        )
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        ids: list[str] = []
        try:
            for token_ids, p in zip(encoded, params_list):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                # Each request gets its own copy: callers may reuse one params object.
                self.engine.add_request(request_id, token_ids, replace(p))
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # a refused prompt refuses the whole batch
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([token_ids], params)[0]


def build_engine_config(model: str, **kwargs) -> EngineConfig:
    groups = {
        "cache": (CacheConfig, {}),
        "batch": (BatchConfig, {}),
    }
    engine_fields: dict = {}
    for key, value in kwargs.items():
        for cls, bucket in groups.values():
            if key in cls.__dataclass_fields__:
                bucket[key] = value
                break
        else:
            if key not in EngineConfig.__dataclass_fields__:
                raise TypeError(f"unknown engine option {key!r}")
            engine_fields[key] = value
    return EngineConfig(
        model=model,
        cache=CacheConfig(**groups["cache"][1]),
        batch=BatchConfig(**groups["batch"][1]),
        **engine_fields,
    )
