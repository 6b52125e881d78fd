"""llama.cpp's multimodal runtime (mtmd, through llama-cpp-python) for the tests that run a text GGUF + mmproj
pair: one session owns the model, the mtmd context and every bitmap and chunk list, and frees them."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest


class Session:
    def __init__(self, llama_cpp, mtmd, llm, ctx):
        self.llama_cpp, self.mtmd, self.llm, self.ctx = llama_cpp, mtmd, llm, ctx
        self._owned: list[tuple] = []

    def image(self, rgb: np.ndarray):
        """A bitmap of an [H, W, 3] uint8 image."""
        h, w = rgb.shape[:2]
        b = self.mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
        self._owned.append((self.mtmd.mtmd_bitmap_free, b))
        return b

    def audio(self, samples: np.ndarray):
        """A bitmap of 16 kHz float samples."""
        b = self.mtmd.mtmd_bitmap_init_from_audio(samples.size, (ctypes.c_float * samples.size)(*samples))
        self._owned.append((self.mtmd.mtmd_bitmap_free, b))
        return b

    def tokenize(self, prompt: bytes, bitmap) -> list:
        """The chunks of `prompt` (one media marker) with `bitmap` in place of the marker."""
        m = self.mtmd
        chunks = m.mtmd_input_chunks_init()
        self._owned.append((m.mtmd_input_chunks_free, chunks))
        text_in = m.mtmd_input_text(prompt, len(prompt), True, True)
        assert m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text_in), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        self.chunks = chunks
        return [m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))]

    def encode(self, chunk, width: int) -> np.ndarray:
        """The soft tokens [n, width] llama.cpp's tower gives for one media chunk."""
        m = self.mtmd
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        assert n > 0 and m.mtmd_encode_chunk(self.ctx, chunk) == 0
        return np.ctypeslib.as_array(m.mtmd_get_output_embd(self.ctx), shape=(n * width,)).reshape(n, width).copy()


@contextmanager
def mtmd_session(text_gguf: Path, mmproj: Path, n_ctx: int = 256) -> Iterator[Session]:
    llama_cpp = pytest.importorskip("llama_cpp")
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    llm = llama_cpp.Llama(str(text_gguf), n_ctx=n_ctx, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, "llama.cpp's mtmd refused the mmproj file"
    s = Session(llama_cpp, mtmd, llm, ctx)
    try:
        yield s
    finally:
        for free, thing in reversed(s._owned):
            free(thing)
        mtmd.mtmd_free(ctx)
        llm.close()
