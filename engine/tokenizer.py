"""Text in and out: a `tokenizers` tokenizer.json, the model's chat template (Jinja, sandboxed),
incremental detokenization of a sequence's output, and the stop-string check over it.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Template
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from engine.sequence import InvalidRequestError, Sequence

# Used when a model ships no chat template: the ChatML layout most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# `--chat-template NAME`: templates shipped in engine/chat_templates/, for models whose own
# template lacks a feature (SmolLM2's ignores `tools`).
BUILTIN_CHAT_TEMPLATES = {"hermes-tools": "hermes_tools.jinja"}


class TokenizerError(RuntimeError):
    pass


class ChatTemplateError(TokenizerError):
    """A `--chat-template` that names no built-in, cannot be read, or is not valid Jinja."""


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers renders templates: plain json.dumps, not Jinja's HTML-escaping tojson.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_chat_template(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def load_chat_template(name_or_path: str) -> str:
    """The Jinja source a `--chat-template` names: a built-in name or a file, compiled once
    here so that a broken one stops start-up rather than every chat request."""
    builtin = BUILTIN_CHAT_TEMPLATES.get(name_or_path)
    path = Path(__file__).parent / "chat_templates" / builtin if builtin else Path(name_or_path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        names = ", ".join(BUILTIN_CHAT_TEMPLATES)
        raise ChatTemplateError(
            f"cannot read {name_or_path!r} ({exc}); give a Jinja file or a built-in name: {names}"
        ) from exc
    try:
        compile_chat_template(source)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{path}: line {exc.lineno}: {exc.message}") from exc
    return source


class Tokenizer:
    def __init__(self, model_dir: Path, chat_template: str | None = None) -> None:
        """`chat_template`: Jinja source that replaces the model's own (`--chat-template`)."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template: str = chat_template or config.get("chat_template") or CHATML_TEMPLATE
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template = compile_chat_template(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` tokenizer itself (its vocabulary, for grammar compilation)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's own spelling of a token (`Ġworld`), not its decoded text."""
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """`tools`: OpenAI tool definitions, for templates that render them (as HF passes them).
        `continue_final_message`: the text ends inside the last message, for the model to go on
        with it (HF's rule: cut after that message's content)."""
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the messages: {exc}") from exc
        if continue_final_message:
            final = (messages[-1].get("content") or "") if messages else ""
            end = text.rfind(final) if final.strip() else -1
            if end == -1:
                raise InvalidRequestError(
                    "continue_final_message needs a last message with content the chat "
                    "template renders verbatim"
                )
            text = text[: end + len(final)]
        return text


def _token_text(token: str | dict | None) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def detokenize(tokenizer: Tokenizer, seq: Sequence) -> int:
    """Brings `seq.text` up to date with its outputs, the same text a full decode gives, by
    decoding only the tokens since the last complete character (as vLLM does: a window from
    `prefix_offset`, less its first part's own text). Returns how much of the text was final
    before, so that stop strings need only be looked for past it."""
    final_before, start = seq.text_final, seq.num_prompt_tokens
    context_ids = seq.token_ids[start + seq.prefix_offset : start + seq.read_offset]
    context = tokenizer.decode(context_ids)
    text = tokenizer.decode(context_ids + seq.token_ids[start + seq.read_offset :])
    if not text.startswith(context):
        # A decoder whose output for a token depends on what follows: decode it all each time.
        seq.text = tokenizer.decode(seq.output_token_ids)
        seq.prefix_offset = seq.read_offset = seq.text_final = 0
        return 0
    new = text[len(context) :]
    seq.text = seq.text[:final_before] + new
    # A replacement character at the end may be a multi-byte character cut short: it stays
    # in the window until complete.
    if new and not new.endswith("\ufffd"):
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_output_tokens
        seq.text_final = len(seq.text)
    return final_before


def find_stop(text: str, stops: list[str], search_from: int) -> int:
    """Index where the earliest stop string starts at or after `search_from`, or -1."""
    best = -1
    for stop in stops:
        # A stop string may straddle the previous text and the new piece.
        idx = text.find(stop, max(0, search_from - len(stop) + 1))
        if idx != -1 and (best == -1 or idx < best):
            best = idx
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(stop.startswith(tail) for stop in stops):
            return k
    return 0
