"""Chat templates: turning a list of {role, content} messages into the prompt text a model
was fine-tuned on (e.g. `<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`).

Models ship their template as Jinja source (GGUF key `tokenizer.chat_template`, or
`chat_template` in tokenizer_config.json). A template is code from a file we did not
write, so it runs in Jinja's immutable sandbox: it can format strings but cannot reach
Python objects' internals or mutate anything. Whitespace handling (trim_blocks,
lstrip_blocks) matches how these templates are rendered by the tools they were written for.
"""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidArgumentError, LucidError


def _raise_exception(message: str):
    raise TemplateError(message)


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's roles; templates know these


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `messages` with the model's chat template."""
    if not template:
        raise LucidError("this model has no chat template (it is a base model): use generate() with a plain prompt")
    if not messages:
        raise InvalidArgumentError("messages is empty")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError("each message must be a dict with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:  # a template would render it as some other role, or drop it
            raise InvalidArgumentError(f"unknown role {m['role']!r}: a message's role is one of {', '.join(CHAT_ROLES)}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra,
        )
    except TemplateError as e:
        raise LucidError(f"the chat template failed: {e}") from None
