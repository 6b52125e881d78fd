"""gemmakit: the hackable PyTorch home of Gemma 3 and Gemma 4.

    import gemmakit
    llm = gemmakit.load()          # the embedded Gemma 3 270M; or gemmakit.load("path/to/model")
    llm.chat([{"role": "user", "content": "What is the capital of France?"}]).content
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gemmakit.api import LLM


def load(model: Any = None, dtype: str = "auto", device: str = "cpu", chat_format: str = "auto",
         context: int | None = None, **options: Any) -> LLM:
    """Load a checkpoint ready to generate and chat (see gemmakit.api.load for `options`: compile, quantize,
    pack, adapter); torch is imported only here."""
    from gemmakit.api import load as _load

    return _load(model, dtype, device, chat_format, context, **options)
