"""flags.py: the words for switches, quantization and chat formats, parsed one way everywhere."""

import pytest

from gemmakit.flags import CHAT_FORMATS, check_chat_format, normalize_quantize, parse_switch


@pytest.mark.parametrize("word", ["on", "ON", " 1 ", "true", "Yes"])
def test_on_words(word):
    assert parse_switch("--pack", word) is True
    assert parse_switch("--pack", word, allow_auto=True) is True


@pytest.mark.parametrize("word", ["off", "Off", "0", "false", "no "])
def test_off_words(word):
    assert parse_switch("--pack", word) is False


def test_auto_only_where_allowed():
    assert parse_switch("--compile", "auto", allow_auto=True) is None
    assert parse_switch("--compile", " AUTO ", True) is None
    with pytest.raises(ValueError, match="GEMMAKIT_SCREEN must be on or off, not 'auto'"):
        parse_switch("GEMMAKIT_SCREEN", "auto")


def test_a_bad_word_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"--compile / GEMMAKIT_COMPILE must be on, off or auto, not 'maybe'"):
        parse_switch("--compile / GEMMAKIT_COMPILE", "maybe", allow_auto=True)
    with pytest.raises(ValueError, match="must be on or off"):
        parse_switch("X", "")


def test_normalize_quantize():
    assert normalize_quantize(None) is None and normalize_quantize("none") is None
    assert normalize_quantize("int8") == "int8" and normalize_quantize("INT4") == "int4"
    with pytest.raises(ValueError, match="unknown quantization 'int3': use none, int8, int4"):
        normalize_quantize("int3")


def test_chat_formats():
    assert CHAT_FORMATS[0] == "auto" and "gemma4-empty-thought" in CHAT_FORMATS
    assert check_chat_format("dialogue") == "dialogue"
    with pytest.raises(ValueError, match="unknown chat format 'gemma2'"):
        check_chat_format("gemma2")
