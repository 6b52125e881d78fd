"""Cheap, deterministic filters that run before and after any model: personal data (PII) found and redacted,
and the user's own regular expressions and keyword lists.

PII kinds, each a pattern plus a check where one exists, so that look-alikes are not redacted:
- EMAIL: local@domain.tld;
- PHONE: international (+CC ...) numbers, or the North American (NNN) NNN-NNNN grouping; 8 to 15 digits;
- CARD: 13 to 19 digits in groups, accepted only if the Luhn checksum holds;
- IBAN: country code, check digits, up to 30 letters/digits, accepted only if the ISO 13616 mod-97 check is 1.
Redaction replaces each finding with its kind in brackets ("[EMAIL]"); findings report kind and span.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


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


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# International numbers start with "+"; national ones are matched in the North American 3-3-4 grouping only,
# so that dates, order numbers and the digits of other identifiers are left alone.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
                    r"|\(?\b\d{3}\)?[ .-]?\d{3}[ .-]\d{4})\b")

CHECKS: dict[str, tuple[re.Pattern[str], Callable[[str], bool]]] = {
    "EMAIL": (_EMAIL, lambda s: True),
    "IBAN": (_IBAN, iban_ok),
    "CARD": (_CARD, lambda s: 13 <= len(re.sub(r"\D", "", s)) <= 19 and luhn_ok(re.sub(r"\D", "", s))),
    "PHONE": (_PHONE, lambda s: 8 <= len(re.sub(r"\D", "", s)) <= 15),
}


def find_pii(text: str, kinds: Iterable[str] = ("EMAIL", "IBAN", "CARD", "PHONE")) -> list[Finding]:
    """Non-overlapping findings, earlier kinds first (an IBAN's digits are not also a phone number)."""
    found: list[Finding] = []
    for kind in kinds:
        pattern, valid = CHECKS[kind]
        for m in pattern.finditer(text):
            if valid(m.group()) and not any(f.start < m.end() and m.start() < f.end for f in found):
                found.append(Finding(kind, m.start(), m.end(), m.group()))
    return sorted(found, key=lambda f: f.start)


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
        words = [re.escape(k) for k in keywords if k.strip()]
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]
        if words:
            self.patterns.append(re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE))

    def match(self, text: str) -> str | None:
        """The first matching text, or None."""
        for p in self.patterns:
            if m := p.search(text):
                return m.group()
        return None
