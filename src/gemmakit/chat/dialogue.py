"""Chatting with a base (pretrained, not instruction-tuned) model: a plain dialogue transcript.

A pretrained Gemma never saw `<start_of_turn>` or `<|turn>` used as a conversation, so the chat template
makes it babble. What it has seen, many times, is text shaped like a transcript. So a base model is prompted
with a short fixed preamble (two example exchanges that set the tone: brief, factual answers) followed by the
conversation as `User:` / `Assistant:` lines, and its answer ends where it starts writing the next `User:`
turn. The embedded Gemma 3 270M answers "What is the capital of France?" with "The capital of France is
Paris." this way. A system message replaces the first line of the preamble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER, ASSISTANT = "User", "Assistant"
DEFAULT_SYSTEM = ("A conversation between a curious User and a helpful, knowledgeable Assistant. "
                  "The Assistant answers questions briefly and accurately.")
EXAMPLES = ((f"{USER}: Hello! Who are you?", f"{ASSISTANT}: Hi! I am a helpful assistant. Ask me anything."),
            (f"{USER}: How many legs does a spider have?", f"{ASSISTANT}: A spider has eight legs."))
# The answer is over when the model starts the next user turn.
STOP_STRINGS = (f"\n{USER}:", f"\n{ASSISTANT}:")


def text_of(content: Any) -> str:
    """The text of an OpenAI-style content field (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def render_dialogue(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The transcript prompt for `messages`; ends with "Assistant:" when a reply is wanted."""
    if not messages:
        raise ValueError("messages is empty; give at least one user message")
    system = DEFAULT_SYSTEM
    lines: list[str] = []
    for m in messages:
        role, text = m.get("role"), text_of(m.get("content")).strip()
        if role in ("system", "developer"):
            system = text
        elif role == "user":
            lines.append(f"{USER}: {text}")
        elif role == "assistant":
            lines.append(f"{ASSISTANT}: {text}")
        elif role != "tool":
            raise ValueError(f"unknown role {role!r}; use system, user, assistant or tool")
    head = "\n".join(line for pair in EXAMPLES for line in pair)
    prompt = f"{system}\n\n{head}\n" + "".join(line + "\n" for line in lines)
    return prompt + f"{ASSISTANT}:" if add_generation_prompt else prompt
