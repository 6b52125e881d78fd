"""Tests for gemmakit.tokenizer: transformers' ids on the real GGUF, round trips, the cache, bad files."""

import json
from pathlib import Path

import gguf
import pytest

import gemmakit.tokenizer as tokenizer_module
from gemmakit.tokenizer import Tokenizer, derive_merges, gemma_pieces
from tests.helpers import default_gguf, transformers_from_gguf

GGUF_PATH = default_gguf()
needs_gguf = pytest.mark.skipif(not GGUF_PATH.is_file(), reason=f"{GGUF_PATH} not downloaded")

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Grüße aus München: Straße, Äpfel, Öl und Übermut.",
    "我们今天去公园散步，天气很好。",
    "東京は日本の首都です。カタカナとひらがな、漢字。",
    "नमस्ते, आप कैसे हैं? हिन्दी भाषा",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 🙂👍🏽 🧑‍🚀 🇩🇪 ❤️ and rare 𠜎 𝄞 \U000f0000",
    "def f(x):\n\tif x:\n\t\treturn x  *  2\n    else:\n        return None\n",
    "a  b   c    d\t\te\t\t\tf        g",
    "\n\n\nthree newlines, then\r\nCRLF\n\n",
    "control \x00\x07\x1b[31mred\x1b[0m \x7f",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <pad><unk> <mask> <unused0> <start_of_image>",
    "<start_of_turn", "almost <eos special", "  leading and trailing spaces  ",
    " ", "", "\u3000ideographic\xa0nbsp",
    "mixed: English, Deutsch, 中文, 日本語, हिन्दी, العربية, 🙂",
]


# ---------------------------------------------------------------------------------------------
# A tiny Gemma-like GGUF, so the conversion rules are tested without the 250 MB file.


def write_gguf(path: Path, pieces: list[tuple[str, int]], arch: str = "gemma3") -> Path:
    """A GGUF holding only tokenizer metadata: `pieces` as (token, llama.cpp token type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _ in pieces])
    writer.add_token_scores([-float(i) for i in range(len(pieces))])
    writer.add_token_types([t for _, t in pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY = (
    [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_turn>", 3), ("\n", 4), ("\n\n", 4)]
    + [("  ", 4)]  # a run of spaces, spelled with real spaces as in Gemma's GGUF
    + [(f"<0x{b:02X}>", 6) for b in range(256)]
    + [(p, 1) for p in ["▁", "h", "e", "l", "o", "he", "ll", "▁h", "llo", "hello", "▁hello"]]
)


def tiny_id(token: str) -> int:
    return [p for p, _ in TINY].index(token)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", TINY)


def test_derive_merges_ranks_by_position_then_longer_left():
    """Merges follow piece order, and within a piece the longer left half comes first."""
    pieces = ["a", "b", "c", "ab", "bc", "abc"]
    vocab = {p: i for i, p in enumerate(pieces)}
    assert derive_merges(pieces, vocab) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_space_runs_are_respelled():
    """Whitespace-only tokens with a space become "▁" runs; other tokens are untouched."""
    assert gemma_pieces(["  ", "   ", "\n", "\t", "a b", "▁x"]) == ["▁▁", "▁▁▁", "\n", "\t", "a b", "▁x"]


def test_tiny_gguf_encodes_like_gemma(tiny_gguf: Path, tmp_path: Path):
    """BPE merges, no prefix space, whole special/user tokens, space runs and byte fallback all work."""
    tok = Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path / "cache")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, len(TINY))
    assert tok.encode("hello", add_bos=False) == [tiny_id("hello")]
    assert tok.encode(" hello") == [2, tiny_id("▁hello")]
    assert tok.encode("  ", add_bos=False) == [tiny_id("  ")]
    assert tok.encode("\n\n<start_of_turn>\n", add_bos=False) == [tiny_id("\n\n"), 4, tiny_id("\n")]
    assert tok.encode("é", add_bos=False) == [tiny_id("<0xC3>"), tiny_id("<0xA9>")]
    for text in ["hello  hello\n", " é\n\nhe<start_of_turn>", "x y"]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.decode(tok.encode("<start_of_turn>hello"), skip_special_tokens=True) == "hello"


def test_cache_is_written_once_and_reused(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The first load writes one cache file; the next loads it without converting again."""
    cache = tmp_path / "cache"
    ids = Tokenizer.from_gguf(tiny_gguf, cache_dir=cache).encode("hello  \n")
    (cache_file,) = cache.iterdir()
    assert cache_file.suffix == ".json"

    def fail(meta):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(tokenizer_module, "build_gemma_backend", fail)
    assert Tokenizer.from_gguf(tiny_gguf, cache_dir=cache).encode("hello  \n") == ids


def test_without_a_cache_dir_the_conversion_goes_to_gemmakits_cache(tiny_gguf: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """With no `cache_dir`, the conversion is cached where every gemmakit cache is (files.cache_dir), so
    GEMMAKIT_CACHE_DIR moves it with the others."""
    monkeypatch.setenv("GEMMAKIT_CACHE_DIR", str(tmp_path / "caches"))
    Tokenizer.from_gguf(tiny_gguf)
    (cache_file,) = (tmp_path / "caches" / "tokenizers").iterdir()
    assert cache_file.name.startswith("gguf-") and cache_file.suffix == ".json"


def test_corrupt_cache_is_rebuilt(tiny_gguf: Path, tmp_path: Path):
    """A damaged cache file is replaced by a fresh conversion, not trusted or fatal."""
    cache = tmp_path / "cache"
    ids = Tokenizer.from_gguf(tiny_gguf, cache_dir=cache).encode("hello")
    (cache_file,) = cache.iterdir()
    cache_file.write_text('{"version": "1.0", "mod')
    assert Tokenizer.from_gguf(tiny_gguf, cache_dir=cache).encode("hello") == ids
    assert json.loads(cache_file.read_text())["model"]["type"] == "BPE"
    assert [p.name for p in cache.iterdir()] == [cache_file.name]  # no temp files left behind


def test_changed_vocab_gets_its_own_cache(tmp_path: Path):
    """Two files with different vocabularies never share a cache entry."""
    cache = tmp_path / "cache"
    a = Tokenizer.from_gguf(write_gguf(tmp_path / "a.gguf", TINY), cache_dir=cache)
    b = Tokenizer.from_gguf(write_gguf(tmp_path / "b.gguf", TINY + [("hel", 1)]), cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert b.vocab_size == a.vocab_size + 1


def test_from_file_reads_tokenizer_json_and_config(tiny_gguf: Path, tmp_path: Path):
    """A saved tokenizer.json plus tokenizer_config.json loads to the same ids and special ids."""
    tok = Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path / "cache")
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>"}
    config["chat_template"] = "x"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_file(folder)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.chat_template) == (2, 1, 0, "x")
    assert loaded.encode(" hello\n\né") == tok.encode(" hello\n\né")


def test_bad_files_give_clear_errors(tiny_gguf: Path, tmp_path: Path):
    """Truncated, empty, non-GGUF and non-Gemma files raise a ValueError saying what is wrong."""
    data = tiny_gguf.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) // 2], "truncated"),
        "empty.gguf": (b"", "too short"),
        "page.gguf": (b"<!DOCTYPE html><html>not found</html>", "not the GGUF magic"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            Tokenizer.from_gguf(tmp_path / name, cache_dir=tmp_path / "cache")
    llama = write_gguf(tmp_path / "llama.gguf", TINY, arch="llama")
    with pytest.raises(ValueError, match="not supported"):
        Tokenizer.from_gguf(llama, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="no such GGUF file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF.


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def gemma(gemma_cache: Path) -> Tokenizer:
    if not GGUF_PATH.is_file():
        pytest.skip(f"{GGUF_PATH} not downloaded")
    return Tokenizer.from_gguf(GGUF_PATH, cache_dir=gemma_cache)


@pytest.fixture(scope="module")
def reference():
    if not GGUF_PATH.is_file():
        pytest.skip(f"{GGUF_PATH} not downloaded")
    pytest.importorskip("transformers")
    return transformers_from_gguf(GGUF_PATH, "tokenizer")


@pytest.mark.slow
def test_matches_transformers(gemma: Tokenizer, reference):
    """Ids (with BOS), decoded text, special ids and the whole tokenizer.json equal transformers'."""
    for text in CORPUS:
        assert gemma.encode(text) == reference(text).input_ids, repr(text)
    assert gemma.encode_batch(CORPUS) == reference(CORPUS).input_ids
    for text in CORPUS:
        ids = gemma.encode(text)
        for skip in (False, True):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert gemma.decode(ids, skip_special_tokens=skip) == expected, repr(text)
    ref_ids = (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, len(reference))
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id, gemma.vocab_size) == ref_ids
    assert json.loads(gemma.backend.to_str()) == json.loads(reference.backend_tokenizer.to_str())


@needs_gguf
def test_round_trip(gemma: Tokenizer):
    """decode(encode(x)) gives x back for every corpus text, including special-token text."""
    for text in CORPUS:
        assert gemma.decode(gemma.encode(text, add_bos=False)) == text, repr(text)


@needs_gguf
def test_special_tokens(gemma: Tokenizer):
    """Gemma's special ids, whole-token matching of turn markers, and lookups."""
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id, gemma.vocab_size) == (2, 1, 0, 262144)
    assert gemma.encode("<start_of_turn>user\n", add_bos=False) == [105, 2364, 107]
    assert gemma.encode("x") == [2, *gemma.encode("x", add_bos=False)]
    assert gemma.decode(gemma.encode("<start_of_turn>user\nHi"), skip_special_tokens=True) == "user\nHi"
    assert gemma.token_to_id("<end_of_turn>") == 106 and gemma.id_to_token(106) == "<end_of_turn>"
    assert gemma.token_to_id("no such token") is None
    assert gemma.id_to_token(-1) is None and gemma.id_to_token(gemma.vocab_size) is None


@needs_gguf
def test_stream_decoding_keeps_characters_whole(gemma: Tokenizer):
    """Feeding ids one at a time yields the full text, never a broken (U+FFFD) character."""
    for text in CORPUS:
        ids = gemma.encode(text, add_bos=False)
        stream = gemma.decode_stream()
        pieces = [stream.step(i) for i in ids]
        assert "".join(pieces) == gemma.decode(ids), repr(text)
        assert not any("\ufffd" in p for p in pieces)


@needs_gguf
def test_real_cache_reused(gemma: Tokenizer, gemma_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """A second load of the real file comes from the cache and encodes identically."""
    assert len(list(gemma_cache.glob("gguf-*.tokenizer.json"))) == 1
    monkeypatch.setattr(tokenizer_module, "build_gemma_backend", lambda meta: pytest.fail("not cached"))
    cached = Tokenizer.from_gguf(GGUF_PATH, cache_dir=gemma_cache)
    assert [cached.encode(t) for t in CORPUS] == [gemma.encode(t) for t in CORPUS]


@needs_gguf
def test_truncated_real_gguf(tmp_path: Path):
    """A download cut off inside the vocabulary says it is truncated instead of failing deep inside."""
    with open(GGUF_PATH, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="truncated.*download it again"):
        Tokenizer.from_gguf(tmp_path / "cut.gguf", cache_dir=tmp_path / "cache")
