"""Cascade checks that look at the question as well as the answer (``needs_prompt = True``).

* :class:`Agreement` — a second cheap answer (another sample, or the same question asked
  again) must agree with the first. Self-consistency is the strongest cheap signal of a
  wrong answer in the literature; it costs one more cheap call, which ``resample`` makes
  (meter it yourself, e.g. with ``engine.record``).
* :class:`ScorerCheck` — the learned scorer's P(cheap answer fails) must stay below a
  threshold. On the prompt alone it escalates what the router would have sent up anyway;
  a scorer you fit on answers (``Scorer.fit(answers, wrong)`` and ``on="answer"``) judges
  the answer text itself.
* :class:`Verifier` — ask a model (``ask(verifier_prompt) -> reply``) whether the answer is
  correct; passes when the reply starts with yes.

None of them calls a model by itself: each takes a callable, so tests use fakes and the
caller chooses (and pays for) the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from budgetkit.errors import ConfigurationError

from ._scorer import Scorer, default_scorer

__all__ = ["Agreement", "ScorerCheck", "Verifier", "final_answer"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL_MARK = re.compile(r"(?:####|answer is|answer:|=)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)",
                         re.IGNORECASE)


def final_answer(text: str) -> str:
    """What two answers are compared on: the final number when the answer has one (the
    number after "####", "answer is", "answer:" or "=", else the last number), otherwise
    the text lower-cased with whitespace and punctuation collapsed."""
    marked = _FINAL_MARK.findall(text)
    numbers = marked or _NUMBER.findall(text)
    if numbers:
        value = str(numbers[-1]).replace(",", "")
        try:
            return repr(float(value))
        except ValueError:
            return value
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Agreement:
    """Passes when ``resample(prompt)`` gives an answer that agrees with the first one.

    ``same(a, b) -> bool`` decides agreement (default: equal :func:`final_answer`).
    """

    needs_prompt = True

    def __init__(self, resample: Callable[[str], str],
                 same: Callable[[str, str], bool] | None = None) -> None:
        if not callable(resample):
            raise ConfigurationError(f"Agreement needs a callable resample, got {resample!r}")
        if same is not None and not callable(same):
            raise ConfigurationError(f"Agreement's same must be callable, got {same!r}")
        self.resample = resample
        self.same = same or (lambda a, b: final_answer(a) == final_answer(b))

    def __call__(self, text: str, prompt: str) -> str | None:
        second = self.resample(prompt)
        if not isinstance(second, str):
            raise ConfigurationError(
                f"Agreement's resample must return a str, got {type(second).__name__}")
        if self.same(text, second):
            return None
        return (f"a second cheap answer disagrees ({final_answer(text)[:40]!r} vs "
                f"{final_answer(second)[:40]!r})")

    def __repr__(self) -> str:
        return f"Agreement({getattr(self.resample, '__name__', self.resample)!r})"


class ScorerCheck:
    """Fails when ``scorer``'s estimate that the answer is not acceptable reaches
    ``threshold`` (default: the scorer's own threshold).

    ``on`` picks the text scored: ``"prompt"`` (default; with the shipped scorer), ``"answer"``
    (a scorer fitted on answers) or ``"both"`` (prompt and answer joined).
    """

    def __init__(self, scorer: Scorer | None = None, threshold: float | None = None, *,
                 on: str = "prompt") -> None:
        if scorer is not None and not isinstance(scorer, Scorer):
            raise ConfigurationError(f"scorer must be a budgetkit Scorer, got {scorer!r}")
        if on not in ("prompt", "answer", "both"):
            raise ConfigurationError(f"on must be 'prompt', 'answer' or 'both', got {on!r}")
        self.scorer = scorer if scorer is not None else default_scorer()
        self.threshold = self.scorer.threshold if threshold is None else threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigurationError(f"threshold must be within 0..1, got {self.threshold}")
        self.on = on
        self.needs_prompt = on != "answer"

    def __call__(self, text: str, prompt: str | None = None) -> str | None:
        scored = {"prompt": prompt or "", "answer": text,
                  "both": f"{prompt or ''}\n\n{text}"}[self.on]
        score = self.scorer.score(scored)
        if score < self.threshold:
            return None
        return f"estimated P(wrong) {score:.3f} >= {self.threshold:.3f}"

    def __repr__(self) -> str:
        return f"ScorerCheck(threshold={self.threshold:.3f}, on={self.on!r})"


DEFAULT_VERIFIER_TEMPLATE = (
    "You check answers. Question:\n{prompt}\n\nProposed answer:\n{answer}\n\n"
    "Is the proposed answer correct and complete? Reply with YES or NO first, then one "
    "sentence why.")


class Verifier:
    """Passes when ``ask(template.format(prompt=..., answer=...))`` replies yes.

    ``accept`` is the regex a passing reply matches at its start (default: yes / correct,
    any case). A reply that matches neither it nor "no" fails too: an unclear verifier is
    no reason to accept.
    """

    needs_prompt = True

    def __init__(self, ask: Callable[[str], str], *,
                 template: str = DEFAULT_VERIFIER_TEMPLATE,
                 accept: str = r"\W*(?:yes|correct)\b") -> None:
        if not callable(ask):
            raise ConfigurationError(f"Verifier needs a callable ask, got {ask!r}")
        if "{prompt}" not in template or "{answer}" not in template:
            raise ConfigurationError("Verifier template must contain {prompt} and {answer}")
        try:
            self.accept = re.compile(accept, re.IGNORECASE)
        except re.error as exc:
            raise ConfigurationError(f"invalid accept regex {accept!r}: {exc}") from None
        self.ask, self.template = ask, template

    def __call__(self, text: str, prompt: str) -> str | None:
        reply = self.ask(self.template.replace("{prompt}", prompt).replace("{answer}", text))
        if not isinstance(reply, str):
            raise ConfigurationError(f"Verifier's ask must return a str, got {type(reply).__name__}")
        if self.accept.match(reply):
            return None
        return f"verifier did not confirm: {reply.strip()[:80]!r}"

    def __repr__(self) -> str:
        return f"Verifier({getattr(self.ask, '__name__', self.ask)!r})"
