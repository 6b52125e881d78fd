"""Input and output guards in front of a model (`gemmakit serve --guard`, `gemmakit chat --guard`).

A guard is a list of rules, each with an action:
- `pii`: personal data (filters.py); `redact` replaces it ([EMAIL], [CARD], ...), `block` refuses;
- `pattern`: regular expressions and keywords; `block`, `warn` or `log`;
- `policy`: a ShieldGemma-style policy (classifier.py) scored by a Gemma model, flagged at its threshold;
  `block`, `warn` or `log`.
Rules apply to the input (the user's messages or a completion prompt, before the model sees anything), the
output (content and thought channel as they stream, tool-call arguments whole), or both.
`block` on input means the model never runs and the answer is a refusal with finish_reason
"content_filter"; on output the stream is cut there, with the same finish reason. `warn` and `log` let text
through and record an event (a log line; `warn` also reaches the caller).

Output is checked as it streams: deterministic rules on every update, policy rules whenever `interval`
more characters have arrived and at the end (each check is a forward pass). Redaction cannot take back
text already sent, so the last `HOLD` characters are held until the text after them shows no personal data
is being written there (no kind of PII this finds is longer). The deterministic rules see only the unsent
text and the `WINDOW` characters before it, so a long stream costs linear time, not a rescan per token.

Configuration (YAML):

    interval: 200
    rules:
      - {name: pii, kind: pii, action: redact}
      - {name: secrets, kind: pattern, action: block, patterns: ['(?i)api[_-]?key\\s*[:=]'], where: output}
      - {name: dangerous, kind: policy, policy: dangerous, threshold: 0.9, action: block, where: input}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.safety.filters import Finding, PatternFilter, find_pii, redact

log = logging.getLogger("gemmakit.guard")
HOLD = 64
WINDOW = 4096  # characters before the unsent text that each output check also sees
KINDS, ACTIONS, PLACES = ("pii", "pattern", "policy"), ("block", "redact", "warn", "log"), ("input", "output", "both")
REFUSAL = "I can't help with that."


@dataclass
class Rule:
    name: str
    kind: str
    action: str = "block"
    where: str = "both"
    patterns: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    policy: str | None = None
    threshold: float = 0.5
    message: str = REFUSAL

    def __post_init__(self) -> None:
        for label, value, allowed in (("kind", self.kind, KINDS), ("action", self.action, ACTIONS),
                                      ("where", self.where, PLACES)):
            if value not in allowed:
                raise ValueError(f"guard rule {self.name!r}: {label} must be one of {', '.join(allowed)}")
        if self.action == "redact" and self.kind != "pii":
            raise ValueError(f"guard rule {self.name!r}: only pii rules can redact")
        if self.kind == "policy" and not self.policy:
            raise ValueError(f"guard rule {self.name!r}: a policy rule needs `policy:`")
        self.filter = PatternFilter(self.patterns, self.keywords) if self.kind == "pattern" else None

    def applies(self, place: str) -> bool:
        return self.where in (place, "both")


@dataclass
class Verdict:
    text: str
    refusal: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    redacted: list[Finding] = field(default_factory=list)  # what `text` had replaced, at positions in the input


class Guard:
    def __init__(self, rules: list[Rule], scorer: Callable[[str, str | None, str], float] | None = None,
                 interval: int = 200):
        self.rules, self.scorer, self.interval = rules, scorer, interval
        if any(r.kind == "policy" for r in rules) and scorer is None:
            raise ValueError("policy rules need a classifier model (gemmakit serve loads the served model)")

    @classmethod
    def from_yaml(cls, path: str | Path, scorer: Callable[[str, str | None, str], float] | None = None) -> Guard:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        try:
            rules = [Rule(**r) for r in data.get("rules", [])]
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(rules, scorer, int(data.get("interval", 200)))

    @property
    def needs_classifier(self) -> bool:
        return any(r.kind == "policy" for r in self.rules)

    def check(self, text: str, place: str, prompt: str | None = None, policies: bool = True,
              deterministic: bool = True) -> Verdict:
        """Run the rules for `place` ("input" or "output") on `text`; redactions are applied to the result.
        `policies` / `deterministic` leave out the policy rules (a model) or the pii and pattern rules."""
        verdict, pii = Verdict(text), None
        for rule in self.rules:
            if not rule.applies(place) or not (policies if rule.kind == "policy" else deterministic):
                continue
            if rule.kind == "pii" and pii is None:
                pii = find_pii(text)  # every pii rule looks for the same findings: once per check
            hit = self._hit(rule, verdict.text, place, prompt, pii)
            if hit is None:
                continue
            event = {"rule": rule.name, "action": rule.action, "where": place, "detail": hit}
            verdict.events.append(event)
            log.info("guard %s", event)  # callers report blocks and warnings in their own way
            if rule.action == "block":
                verdict.refusal = rule.message
                return verdict
            if rule.action == "redact" and not verdict.redacted:
                verdict.text, verdict.redacted = redact(text, pii), pii
        return verdict

    def _hit(self, rule: Rule, text: str, place: str, prompt: str | None, pii: list[Finding] | None) -> str | None:
        if rule.kind == "pii":
            return ", ".join(sorted({f.kind for f in pii or []})) or None
        if rule.kind == "pattern":
            return rule.filter.match(text)
        score = self.scorer(prompt if place == "output" else text, text if place == "output" else None,
                            rule.policy) if text.strip() else 0.0
        return f"P({rule.policy})={score:.3f}" if score >= rule.threshold else None

    def check_messages(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Verdict]:
        """The user messages checked (and redacted) one by one; the first refusal stops. In a message made of
        parts, each text part is checked (the text around an image or a clip); the pixels and samples
        themselves are not: no rule reads images or audio."""
        out, events = [], []
        for m in messages:
            content = m.get("content")
            if m.get("role") != "user" or not isinstance(content, str | list):
                out.append(m)
                continue
            texts = [content] if isinstance(content, str) else [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            checked = []
            for text in texts:
                verdict = self.check(text if isinstance(text, str) else "", "input")
                events += verdict.events
                if verdict.refusal:
                    return messages, Verdict(text, verdict.refusal, events)
                checked.append(verdict.text)
            if isinstance(content, str):
                out.append({**m, "content": checked[0]})
                continue
            redacted = iter(checked)
            out.append({**m, "content": [{**p, "text": next(redacted)} if isinstance(p, dict) and p.get("type") ==
                                         "text" else p for p in content]})
        return out, Verdict("", None, events)


class OutputWatch:
    """One generated message under a guard: feed the accumulated text, get what is safe to send now.

    Each update checks only the text not yet sent plus the `WINDOW` characters before it, so a long message
    costs linear time overall rather than a rescan of everything on every token; a pattern match longer than
    `WINDOW` can go unseen. Policy rules (a model) still score the whole message, every `interval` characters.
    """

    def __init__(self, guard: Guard, prompt: str | None = None):
        self.guard, self.prompt = guard, prompt
        self.sent, self.scored_at, self.refusal = "", 0, None
        self.done = 0  # characters of the raw text already released (redacted, they make up `sent`)
        self.events: list[dict[str, Any]] = []

    def update(self, content: str, final: bool) -> str:
        """New text to send (possibly redacted); after a block, `refusal` is set and nothing more is sent."""
        if self.refusal is not None:
            return ""
        if final or len(content) - self.scored_at >= self.guard.interval:
            self.scored_at = len(content)
            if self._blocked(self.guard.check(content, "output", self.prompt, deterministic=False)):
                return ""
        start = max(0, self.done - WINDOW)
        verdict = self.guard.check(content[start:], "output", self.prompt, policies=False)
        if self._blocked(verdict):
            return ""
        found = [Finding(f.kind, f.start + start, f.end + start, f.text) for f in verdict.redacted]
        if any(f.start < self.done < f.end for f in found):  # a finding reached back into sent text: no more
            return ""
        cut = len(content) if final else self._cut(found, len(content) - HOLD)
        inside = [Finding(f.kind, f.start - self.done, f.end - self.done, f.text) for f in found
                  if self.done <= f.start and f.end <= cut]
        new = redact(content[self.done:cut], inside)
        self.sent, self.done = self.sent + new, cut
        return new

    def _blocked(self, verdict: Verdict) -> bool:
        self.events += verdict.events
        self.refusal = verdict.refusal
        return verdict.refusal is not None

    def _cut(self, found: list[Finding], cut: int) -> int:
        """Where to stop releasing: before `cut`, and never inside a finding (nor at the end of one that more
        text could still extend)."""
        for f in reversed(found):  # sorted and disjoint: at most one holds the cut
            if f.start < cut <= f.end:
                cut = f.start
                break
        return max(cut, self.done)


class MessageWatch:
    """A streamed chat message under a guard, for the server's choices and the terminal chat alike: content
    and the thought channel each go through an `OutputWatch` (held back, redacted), tool-call arguments are
    checked whole (the parser hands them over whole). After a refusal nothing more is let through."""

    def __init__(self, guard: Guard, prompt: str | None = None):
        self.guard, self.prompt = guard, prompt
        self.content, self.reasoning = OutputWatch(guard, prompt), OutputWatch(guard, prompt)
        self.raw_content = self.raw_reasoning = ""

    @property
    def refusal(self) -> str | None:
        return self.content.refusal or self.reasoning.refusal

    def update(self, delta: Any, final: bool) -> str | None:
        """Rewrite `delta` (a chat parser Delta, the message's next part) in place to what may be shown now;
        the refusal if a rule blocks. With `final`, whatever was held back is released."""
        self.raw_content += delta.content
        self.raw_reasoning += delta.reasoning
        delta.content = self.content.update(self.raw_content, final)
        delta.reasoning = self.reasoning.update(self.raw_reasoning, final) if self.refusal is None else ""
        for call in delta.tool_calls if self.refusal is None else ():
            verdict = self.guard.check(call.arguments, "output", self.prompt)
            self.content.events += verdict.events
            call.arguments = verdict.text  # PII tags keep the JSON valid
            if verdict.refusal:
                self.content.refusal = verdict.refusal
                break
        if self.refusal is not None:
            delta.content, delta.reasoning, delta.tool_calls = "", "", []
        return self.refusal


def policy_scorer(model: Any, tokenizer: Any) -> Callable[[str, str | None, str], float]:
    """P(violation) of (user text, response or None) for a built-in policy key, with `model` as classifier."""
    from gemmakit.safety.classifier import POLICIES, PolicyClassifier

    classifier = PolicyClassifier(model, tokenizer, batch_size=1)

    def score(user: str, response: str | None, policy: str) -> float:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; built in: {', '.join(POLICIES)}")
        return classifier.score([(user, response)], {policy: POLICIES[policy]})[0][policy]
    return score


def load_guard(path: str | Path, llm: Any) -> Guard:
    """A guard from YAML, scoring policies with `llm`'s model when it has policy rules."""
    guard = Guard.from_yaml(path, scorer=lambda *a: 0.0)
    if guard.needs_classifier:
        guard.scorer = policy_scorer(llm.model, llm.tokenizer)
    return guard
