"""Cheap, deterministic filters that run before and after any model: personal data (PII) found and redacted,
and the user's own regular expressions and keyword lists.

PII kinds, each a pattern plus a check where one exists, so that look-alikes are not redacted:
- EMAIL: local@domain.tld;
- PHONE: international (+CC ...) numbers, or the North American (NNN) NNN-NNNN grouping; 8 to 15 digits;
- CARD: 13 to 19 digits in groups, accepted only if the Luhn checksum holds;
- IBAN: country code, check digits, up to 30 letters/digits, accepted only if the ISO 13616 mod-97 check is 1.
Redaction replaces each finding with its kind in brackets ("[EMAIL]"); findings report kind and span.

Every pattern runs on RE2 (google-re2), whose matching time is linear in the text whatever the pattern and the
input: these filters see text a hostile client wrote, and Python's backtracking engine is quadratic on inputs
as simple as "a.a.a.a..." against the email pattern (and holds the GIL meanwhile, so the whole server
stalls). RE2 has no look-around, so the phone pattern's "not after a letter, digit or +" is a group around
the number instead, and its word boundaries, word and digit classes are ASCII (Python's are Unicode): a word
boundary next to a non-ASCII letter counts as one. Keywords get explicit Unicode word boundaries. A user
pattern that RE2 cannot compile (back-references, look-around) still works on Python's engine, with a
warning that it is not linear-time; callers bound the text they hand it (safety/guard.py's OutputWatch does).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import re2

log = logging.getLogger("gemmakit.guard")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    text: str


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = re.sub(r"\s", "", text).upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_EMAIL = re2.compile(r"\b([A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})\b")
_IBAN = re2.compile(r"\b([A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?)\b")
_CARD = re2.compile(r"\b((?:\d[ -]?){12,18}\d)\b")
# International numbers start with "+"; national ones are matched in the North American 3-3-4 grouping only,
# so that dates, order numbers and the digits of other identifiers are left alone. The number is the group; the
# character before it, if any, must not be a letter, digit, "_" or "+".
_PHONE = re2.compile(r"(?:^|[^\w+])((?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
                     r"|\(?\b\d{3}\)?[ .-]?\d{3}[ .-]\d{4}))\b")


def _digits(s: str) -> str:
    return "".join(c for c in s if "0" <= c <= "9")


# Each pattern's group 1 is the finding.
CHECKS: dict[str, tuple[Any, Callable[[str], bool]]] = {
    "EMAIL": (_EMAIL, lambda s: True),
    "IBAN": (_IBAN, iban_ok),
    "CARD": (_CARD, lambda s: 13 <= len(_digits(s)) <= 19 and luhn_ok(_digits(s))),
    "PHONE": (_PHONE, lambda s: 8 <= len(_digits(s)) <= 15),
}


def find_pii(text: str, kinds: Iterable[str] = ("EMAIL", "IBAN", "CARD", "PHONE")) -> list[Finding]:
    """Non-overlapping findings, earlier kinds first (an IBAN's digits are not also a phone number)."""
    found: list[Finding] = []
    for kind in kinds:
        pattern, valid = CHECKS[kind]
        new = [Finding(kind, *m.span(1), m.group(1)) for m in pattern.finditer(text) if valid(m.group(1))]
        found = _merge(found, new)
    return found


def _merge(kept: list[Finding], new: list[Finding]) -> list[Finding]:
    """`kept` plus the findings of `new` that overlap none of it; both sorted and non-overlapping, so one
    sweep does it (checking each new finding against all kept ones was quadratic in their number)."""
    out, i = [], 0
    for f in new:
        while i < len(kept) and kept[i].end <= f.start:
            out.append(kept[i])
            i += 1
        if i < len(kept) and kept[i].start < f.end:  # kept[i] ends after f starts: they overlap
            continue
        out.append(f)
    return out + kept[i:]


def redact(text: str, findings: list[Finding]) -> str:
    out, at = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        out += [text[at:f.start], f"[{f.kind}]"]
        at = f.end
    return "".join(out) + text[at:]


def redact_pii(text: str, kinds: Iterable[str] = ("EMAIL", "IBAN", "CARD", "PHONE")) -> str:
    return redact(text, find_pii(text, kinds))


class PatternFilter:
    """Blocks text matching any regular expression or containing any keyword (case-insensitive, whole words)."""

    def __init__(self, patterns: Iterable[str] = (), keywords: Iterable[str] = ()):
        words = [re2.escape(k) for k in keywords if k.strip()]
        self.patterns = [_compile(p) for p in patterns]
        if words:  # the keyword is group 1; the characters around it, if any, are not word characters
            self.patterns.append(_compile(f"(?:^|{_NOT_WORD})((?:{'|'.join(words)}))(?:$|{_NOT_WORD})"))

    def match(self, text: str) -> str | None:
        """The first matching text, or None."""
        for p in self.patterns:
            if m := p.search(text):
                return m.group(1) if p.groups else m.group()
        return None


_NOT_WORD = r"[^\p{L}\p{N}_]"  # Python's Unicode \W, which RE2's ASCII \W is not


def _compile(pattern: str) -> Any:
    """`pattern`, case-insensitive, on RE2; on Python's engine (with a warning) if RE2 cannot take it."""
    options = re2.Options()
    options.case_sensitive = False
    try:
        return re2.compile(pattern, options)
    except re2.error:
        log.warning("pattern %r needs Python's backtracking regex engine (RE2 cannot compile it), whose time is "
                    "not linear in the text; rewrite it without look-around or back-references if you can",
                    pattern)
        return re.compile(pattern, re.IGNORECASE)
