"""Chat templates: the Jinja program a Hugging Face checkpoint ships to turn a conversation into its prompt.

An instruct model only behaves when prompted in the format it was trained on, so templates are rendered as
`transformers`' `apply_chat_template` renders them: an immutable sandboxed Jinja2 environment (a template from a
checkpoint is untrusted code) with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson`
that leaves HTML alone, the globals `raise_exception` and `strftime_now`, and the variables `messages`,
`add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...) of `tokenizer_config.json`. The
rendered text is tokenized without adding special tokens: the template writes its own.

A checkpoint's template is its `chat_template.jinja`, else the `chat_template` entry of `tokenizer_config.json`
(the one named "default" when it holds several). A base model has none; `TRANSCRIPT` then gives a plain
"Role: content" transcript, but only when asked for.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxhet.generation_config import read_json
from jaxhet.tokenizers import Tokenizer, special_tokens

TRANSCRIPT = "transcript"
TEMPLATE_FILE = "chat_template.jinja"
_TRANSCRIPT_SOURCE = (
    "{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, compiled or rendered; the message says which and why."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template, the special tokens it is rendered with, and where it came from (for messages).

    `stop` holds strings that end a reply besides the tokenizer's stop ids; `bos` prepends the tokenizer's BOS id
    to the rendered prompt's ids (the transcript is prompted like a completion; checkpoint templates write their
    own BOS).
    """

    source: str
    origin: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    stop: tuple[str, ...] = ()
    bos: bool = False

    def __post_init__(self) -> None:
        try:
            _compile(self.source)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"{self.origin}: the chat template does not compile: {err}") from None

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (dicts with `role` and `content`), opening the assistant's reply when
        `add_generation_prompt`; a template that refuses the conversation raises `ChatTemplateError` saying why."""
        try:
            return _compile(self.source).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template refused the conversation: {err}") from None

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the prompt that opens the assistant's reply to `messages`, as `transformers`'
        `apply_chat_template(messages, add_generation_prompt=True)` makes them."""
        ids = tokenizer.encode(self.render(messages, add_generation_prompt=True))
        return [tokenizer.bos_id, *ids] if self.bos and tokenizer.bos_id is not None else ids


def _checkpoint_template(directory: Path) -> tuple[str, str] | None:
    """(source, origin) of the template the checkpoint in `directory` ships, or None."""
    path = directory / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(), str(path)
    config_path = directory / "tokenizer_config.json"
    template = read_json(config_path).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ChatTemplateError(f"{config_path}: chat_template must be a string or a list of named templates")
    return template, f"{config_path} chat_template"


def load_chat_template(directory: Path | None, override: str | Path | None = None) -> ChatTemplate | None:
    """The chat template a model is served with: `override` when given (a Jinja file, or "transcript"), else the
    one its checkpoint in `directory` ships; None when neither is there (a base model)."""
    tokens = special_tokens(directory) if directory is not None else {}
    if override is not None and str(override) == TRANSCRIPT:
        return ChatTemplate(_TRANSCRIPT_SOURCE, TRANSCRIPT, tokens, stop=("\n\nUser:", "\n\nSystem:"), bos=True)
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"--chat-template {override}: no such file (or give {TRANSCRIPT!r})")
        return ChatTemplate(path.read_text(), str(path), tokens)
    found = _checkpoint_template(directory) if directory is not None else None
    return ChatTemplate(found[0], found[1], tokens) if found is not None else None
