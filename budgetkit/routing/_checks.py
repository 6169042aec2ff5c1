"""Acceptability checks for a :class:`~budgetkit.routing.Cascade`.

A check is a small callable ``check(text) -> str | None``: ``None`` when the answer passes,
else why it fails. Checks that need the question as well as the answer (agreement of two
samples, a learned estimate, a verifier model) set ``needs_prompt = True`` and are called as
``check(text, prompt)``; the cascade passes the prompt it was given.

Text-only: :class:`MinLength`, :class:`RequiredElements`, :class:`MatchesRegex`,
:class:`ValidJSON` (optionally against a JSON schema subset), :class:`ScoreAtLeast` (a user
scorer against a threshold). With the prompt: :class:`Agreement`, :class:`ScorerCheck`,
:class:`Verifier` (in ``_model_checks.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from budgetkit.errors import ConfigurationError

__all__ = ["Check", "MinLength", "RequiredElements", "MatchesRegex", "ValidJSON",
           "ScoreAtLeast"]


class Check(Protocol):
    """An acceptability check: ``None`` when the answer passes, else the reason it fails."""

    def __call__(self, text: str) -> str | None: ...


# ----------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class MinLength:
    """At least ``chars`` characters (after stripping whitespace)."""

    chars: int

    def __post_init__(self) -> None:
        if self.chars < 0:
            raise ConfigurationError(f"MinLength chars must be >= 0, got {self.chars}")

    def __call__(self, text: str) -> str | None:
        length = len(text.strip())
        return None if length >= self.chars else f"too short ({length} < {self.chars} chars)"


@dataclass(frozen=True)
class RequiredElements:
    """Every element occurs in the answer (case-insensitive unless ``case_sensitive``)."""

    elements: tuple[str, ...]
    case_sensitive: bool = False

    def __init__(self, *elements: str, case_sensitive: bool = False) -> None:
        if len(elements) == 1 and not isinstance(elements[0], str):
            elements = tuple(elements[0])  # RequiredElements(["a", "b"]) works too
        if not elements or not all(isinstance(e, str) and e for e in elements):
            raise ConfigurationError(f"RequiredElements needs non-empty strings, got {elements!r}")
        object.__setattr__(self, "elements", tuple(elements))
        object.__setattr__(self, "case_sensitive", case_sensitive)

    def __call__(self, text: str) -> str | None:
        haystack = text if self.case_sensitive else text.lower()
        missing = [e for e in self.elements
                   if (e if self.case_sensitive else e.lower()) not in haystack]
        return f"missing required element(s): {', '.join(map(repr, missing))}" if missing else None


class MatchesRegex:
    """The answer matches ``pattern`` somewhere (``re.search``), or nowhere if ``negate``."""

    def __init__(self, pattern: str | re.Pattern[str], *, flags: int = 0,
                 negate: bool = False) -> None:
        try:
            self.pattern = (pattern if isinstance(pattern, re.Pattern)
                            else re.compile(pattern, flags))
        except re.error as exc:
            raise ConfigurationError(f"invalid regex {pattern!r}: {exc}") from None
        self.negate = negate

    def __call__(self, text: str) -> str | None:
        found = self.pattern.search(text) is not None
        if found != self.negate:
            return None
        verb = "matches" if self.negate else "does not match"
        return f"answer {verb} /{self.pattern.pattern}/"

    def __repr__(self) -> str:
        return f"MatchesRegex({self.pattern.pattern!r}, negate={self.negate})"


_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?```\s*$", re.DOTALL)
_SCHEMA_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "enum", "const", "additionalProperties",
    "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems",
    # annotations, no effect on validity
    "title", "description", "default", "examples", "$schema", "$id",
})


class ValidJSON:
    """The answer parses as JSON and, with ``schema``, satisfies it.

    The schema support is a dependency-free subset of JSON Schema: ``type`` (one or a
    list), ``properties``, ``required``, ``additionalProperties: false`` or a schema,
    ``items``, ``enum``, ``const``, ``minLength`` / ``maxLength``, ``minimum`` /
    ``maximum``, ``minItems`` / ``maxItems``. A schema using any other keyword is refused
    when the check is built (ConfigurationError), so a check never passes by ignoring a
    rule. A fenced block (```json ... ```) is accepted unless ``allow_fences=False``.
    """

    def __init__(self, schema: Mapping[str, Any] | None = None, *,
                 allow_fences: bool = True) -> None:
        if schema is not None:
            _check_schema(schema, "$")
        self.schema = schema
        self.allow_fences = allow_fences

    def parse(self, text: str) -> Any:
        """The answer's JSON value (raises ``ValueError`` when it is not JSON)."""
        if self.allow_fences:
            fenced = _FENCE.match(text)
            if fenced:
                text = fenced.group(1)
        return json.loads(text)

    def __call__(self, text: str) -> str | None:
        try:
            value = self.parse(text)
        except ValueError as exc:
            return f"not valid JSON ({exc})"
        if self.schema is None:
            return None
        errors = _validate(value, self.schema, "$")
        return f"JSON does not match the schema: {'; '.join(errors[:3])}" if errors else None


def _check_schema(schema: Any, path: str) -> None:
    if not isinstance(schema, Mapping):
        raise ConfigurationError(f"schema at {path} must be an object, got {schema!r}")
    unknown = set(schema) - _SCHEMA_KEYWORDS
    if unknown:
        raise ConfigurationError(
            f"schema at {path} uses unsupported keyword(s) {', '.join(sorted(unknown))}; "
            f"ValidJSON supports {', '.join(sorted(_SCHEMA_KEYWORDS))}")
    types = schema.get("type")
    for name in ([types] if isinstance(types, str) else types or []):
        if name not in _SCHEMA_TYPES:
            raise ConfigurationError(f"schema at {path} has unknown type {name!r}")
    for key, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), Mapping):
        _check_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        _check_schema(schema["additionalProperties"], f"{path}.*")


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_SCHEMA_TYPES[name](value) for name in names):
            return [f"{path} is {type(value).__name__}, expected {' or '.join(names)}"]
    errors: list[str] = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path} must equal {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} must be one of {schema['enum']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path} shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path} longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path} below minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path} above maximum {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path} has fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path} has more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), Mapping):
            for i, item in enumerate(value):
                errors.extend(_validate(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                errors.append(f"{path} lacks required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors.extend(_validate(item, properties[key], f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path} has unexpected property {key!r}")
            elif isinstance(extra, Mapping):
                errors.extend(_validate(item, extra, f"{path}.{key}"))
    return errors


class ScoreAtLeast:
    """A user scorer ``scorer(text) -> float`` must reach ``threshold``."""

    def __init__(self, scorer: Callable[[str], float], threshold: float) -> None:
        if not callable(scorer):
            raise ConfigurationError(f"scorer must be callable, got {scorer!r}")
        self.scorer, self.threshold = scorer, threshold

    def __call__(self, text: str) -> str | None:
        score = float(self.scorer(text))
        return None if score >= self.threshold else (
            f"score {score:.3g} < threshold {self.threshold:.3g}")

    def __repr__(self) -> str:
        return f"ScoreAtLeast({getattr(self.scorer, '__name__', self.scorer)!r}, {self.threshold})"
