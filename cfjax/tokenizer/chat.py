"""Chat templates: render jinja chat templates exactly as transformers does, plus built-in formats.

A model's own template (GGUF `tokenizer.chat_template`, HF `tokenizer_config.json`) is the authority
for its prompt format; the built-ins below cover files that ship none. They are written as jinja
templates too, so one renderer serves every case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Meta's Llama 3 Instruct format (llama3 repo ChatFormat, which strips message content; the HF
# template trims likewise): <|begin_of_text|> then per message
# <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>, then the assistant header.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Meta's Llama 2 reference (llama/generation.py `chat_completion`): the system prompt is wrapped in
# <<SYS>> and merged into the first user turn, each user turn is `<s>[INST] {user} [/INST]` and each
# answer ` {answer} </s>`; contents are stripped. Roles must alternate user/assistant.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 chat roles must alternate user/assistant/user/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim"
    " + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# ChatML (SmolLM2 and others); no default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def builtin_template(special_tokens: Mapping[str, int]) -> str | None:
    """The built-in chat format that fits a vocabulary's special tokens, or None."""
    if "<|start_header_id|>" in special_tokens and "<|eot_id|>" in special_tokens:
        return LLAMA3_TEMPLATE
    if "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens:
        return CHATML_TEMPLATE
    if "<s>" in special_tokens and "</s>" in special_tokens:
        return LLAMA2_TEMPLATE
    return None


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks (rendered as-is)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False
) -> str:
    # Like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ').
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # The same environment as transformers' `_compile_jinja_template`: chat templates ship with
    # downloaded models, so they run sandboxed.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a chat template like transformers' `apply_chat_template(..., tokenize=False)`."""
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")
    # `tools`/`documents` are passed as None, not left undefined: templates test `is not none`.
    return _compile(template).render(
        messages=[dict(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
