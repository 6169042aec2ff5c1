"""One request to :class:`~langchain_budgetkit.RoutedChatModel`: its state, and the
attribution its usage rows carry.

The routed model records its inner calls itself (it admits them, so a budget can stop
one), which means the tracking handler does not: the rows must get from here what the
handler would have given them. From the LangChain run that invoked the routed model (its
run manager): ``operation_type`` / ``user_id`` / ``session_id`` / ``project`` /
``task_type`` / ``request_id`` and any other ``metadata`` (kept in the row's metadata), its
tags, and the defaults of a budgetkit handler among its callbacks. Run ids: each inner
call's row has the inner run's own id (the routed model starts that run with it), the
routed model's run as parent, and the routed run's root: the handler's view of the run
tree when one is attached, else a LangChain tracer's ``trace_id``, else the routed run
itself when it has no parent (unknown otherwise).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.messages import BaseMessage

from budgetkit.fitting import FitReport
from budgetkit.routing import explain_fit, fit_summary

from ._tracker import _Tracker
from ._usage_parse import json_safe

__all__ = ["RoutedCall", "FittedPrompt", "RunAttribution", "run_attribution",
           "ROUTED_MARKER", "METERED_MARKER", "PARSED_KEY"]

#: In the routed model's run metadata and in its answers' ``response_metadata``: the run is
#: a wrapper whose cost is recorded on its inner runs (a tracker must not count it).
ROUTED_MARKER = "budgetkit_routed"
#: In an inner run's metadata: the routed model's engine has already recorded this call.
METERED_MARKER = "budgetkit_metered"
#: Where the chosen model's parsed structured output travels in ``additional_kwargs``.
PARSED_KEY = "budgetkit_parsed"

_ATTRIBUTION_KEYS = ("operation_type", "user_id", "session_id", "project", "task_type",
                     "request_id")
# metadata keys that are LangChain's or budgetkit's own, not the user's
_INTERNAL_PREFIXES = ("ls_", "lc_", "budgetkit_")


@dataclass
class FittedPrompt:
    """The prompt one model receives after ``fit_context`` cut it to its window."""

    model: str
    messages: list[BaseMessage]
    openai_messages: list[dict[str, Any]]
    report: FitReport

    @property
    def summary(self) -> dict[str, Any]:
        """What the usage row and the answer's marker record about the fit."""
        return fit_summary(self.model, self.report)

    def explain(self, reason: str) -> str:
        return explain_fit(reason, self.model, self.report)


@dataclass
class RunAttribution:
    """What every usage row of one routed request carries (see the module docs)."""

    fields: dict[str, str] = field(default_factory=dict)  # operation_type, user_id, ...
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None  # the routed model's run
    root_run_id: str | None = None

    def row_kwargs(self, run_id: str) -> dict[str, Any]:
        """Admit keyword arguments for one inner call whose run id is ``run_id``."""
        return dict(self.fields, run_id=run_id, parent_run_id=self.parent_run_id,
                    root_run_id=self.root_run_id, tags=self.tags)


def _tracker_of(run_manager: Any) -> _Tracker | None:
    for handler in getattr(run_manager, "handlers", None) or ():
        if isinstance(handler, _Tracker):
            return handler
    return None


def _root_of(run_manager: Any, tracker: _Tracker | None) -> str | None:
    run_id: UUID = run_manager.run_id
    if tracker is not None:
        root = tracker._roots.get(run_id)  # the handler saw this run start
        if root is not None:
            return str(root)
    for handler in getattr(run_manager, "handlers", None) or ():
        run = getattr(handler, "run_map", {}).get(str(run_id))  # LangChain tracers
        trace_id = getattr(run, "trace_id", None)
        if trace_id is not None:
            return str(trace_id)
    return str(run_id) if run_manager.parent_run_id is None else None


def run_attribution(run_manager: Any, task_type: str | None) -> tuple[RunAttribution, str]:
    """The attribution of the run ``run_manager`` belongs to, and its request id."""
    if run_manager is None:
        attribution = RunAttribution()
        if task_type:
            attribution.fields["task_type"] = task_type
        return attribution, uuid.uuid4().hex
    metadata = {**(getattr(run_manager, "inheritable_metadata", None) or {}),
                **(getattr(run_manager, "metadata", None) or {})}
    tracker = _tracker_of(run_manager)
    fields: dict[str, str] = {}
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] = {}
    if tracker is not None:  # the handler's defaults, as it would apply them
        fields.update({key: value for key, value in tracker.defaults.items()
                       if value is not None})
        tags = tracker.tags
        extra.update(tracker.metadata)
    for key, value in metadata.items():
        if key in _ATTRIBUTION_KEYS:
            if value is not None:
                fields[key] = value if isinstance(value, str) else str(value)
        elif not key.startswith(_INTERNAL_PREFIXES):
            extra[key] = json_safe(value)
    if task_type:  # already resolved: task_type= of the call, the metadata's, the model's
        fields["task_type"] = task_type
    request_id = fields.pop("request_id", None) or uuid.uuid4().hex
    tags = tags + tuple(tag for tag in (run_manager.tags or ()) if tag not in tags)
    return RunAttribution(fields=fields, tags=tags, metadata=extra,
                          parent_run_id=str(run_manager.run_id),
                          root_run_id=_root_of(run_manager, tracker)), request_id


@dataclass
class RoutedCall:
    """One request: its routing inputs and its attempt counter."""

    messages: list[BaseMessage]
    openai_messages: list[dict[str, Any]]
    stop: list[str] | None
    kwargs: dict[str, Any]
    request_id: str
    attribution: RunAttribution
    required_model: str | None
    task_type: str | None
    low_latency: bool
    tools: dict[str, Any] | None
    structured: dict[str, Any] | None
    attempts: int = 0
    model: str | None = None  # the model of the latest attempt
    # fit_context: model -> its fitted prompt (None: the whole prompt fits that model)
    fitted: dict[str, FittedPrompt | None] = field(default_factory=dict)

    def prompt_for(self, model: str) -> tuple[list[BaseMessage], list[dict[str, Any]]]:
        """The messages ``model`` is sent (LangChain and OpenAI form)."""
        fitted = self.fitted.get(model)
        if fitted is None:
            return self.messages, self.openai_messages
        return fitted.messages, fitted.openai_messages

    def explain(self, model: str | None, reason: str) -> str:
        """``reason`` plus what fitting the prompt to ``model`` did, if anything."""
        fitted = self.fitted.get(model) if model else None
        return reason if fitted is None else fitted.explain(reason)
