"""Admission lanes: the budget check of a busy adapter, without building a ticket first.

An adapter that admits many calls of the same model and attribution (a LangChain handler
of one user's chain, say) does the same work for each: find the budget windows the call
counts in, price its worst case, take it from this process's leases. The windows and the
price are the same from call to call; only the prompt's size and the output limit
change. A lane remembers the first two, made from a ticket admitted the ordinary way:

    ticket = engine.admit(model, messages=..., user_id="alice")  # the full check
    lane = engine.lane(ticket)  # None: calls like it cannot be admitted in memory
    ...
    held = lane.admit(input_bound, max_output_tokens)  # the next call like it
    if held is None:
        ticket = engine.admit(...)  # the full check again (it also refreshes the leases)
    else:
        ...  # make the call; build the ticket later, off the caller's thread:
        ticket = engine.ticket(model, messages=..., user_id="alice")
        held.attach(ticket)  # it now holds what the lane reserved; settle or release it

``lane.admit`` succeeds only when the full check would have allowed the call without a
word: every window has a lease with room (see ``_budget_lease``) and stays below its first
level and its downgrade hint after the call. Anything else (no lease yet, a window near a
level, a new day's windows, budgets added or removed, an expired-reservation sweep due)
returns None and the caller admits the ordinary way, which decides, warns, blocks or
alerts. The worst case is priced on ``input_bound``, an upper bound of the prompt's
tokens (bytes of text are enough: see :func:`budgetkit._tokens.message_tokens_bound`), so
what a lane reserves is never less than the full check would.
"""

from __future__ import annotations

from typing import Any

from ._budget_lease import Lease
from ._money import PICOS_PER_NANO

__all__ = ["AdmissionLane", "Held"]

_HALF_NANO = PICOS_PER_NANO // 2  # cost_nanos rounds half up


class AdmissionLane:
    """The windows and price of calls like one admitted ticket (same model, provider,
    user, project, operation and tags)."""

    __slots__ = ("_book", "_budgets", "_valid_from", "_valid_until", "_targets",
                 "_input_picos", "_output_picos", "_usd", "_default_output", "_limits")

    def __init__(self, book: Any, budgets: Any, valid: tuple[Any, Any],
                 targets: list[tuple[Any, ...]], price: Any, default_output: int) -> None:
        self._book = book
        self._budgets = budgets  # the registry the targets were found in
        self._valid_from, self._valid_until = valid
        self._targets = targets
        self._input_picos, self._output_picos = price.input_picos, price.output_picos
        self._usd = tuple(budget.unit == "usd" for budget, *_rest in targets)
        self._default_output = default_output
        # Below these (spent + reserved after the call) the full check would say "allow".
        self._limits = tuple(_allow_limit(budget) for budget, *_rest in targets)

    def admit(self, input_bound: int, max_output_tokens: int | None = None) -> Held | None:
        """Take a call's worst case from the leases of every window, or nothing (None)."""
        book = self._book
        if book._budgets is not self._budgets:
            return None  # budgets were added or removed since
        now = book.clock()
        if not self._valid_from <= now < self._valid_until \
                or book._next_reap is None or now >= book._next_reap:
            return None
        output = self._default_output if max_output_tokens is None else max_output_tokens
        # price.cost_nanos(input_bound, output), without its argument checks
        nanos = (input_bound * self._input_picos + output * self._output_picos
                 + _HALF_NANO) // PICOS_PER_NANO
        tokens = input_bound + output
        amounts = [nanos if usd else tokens for usd in self._usd]
        leases = book._desk.take_all(self._targets, amounts, now, self._limits)
        if leases is None:
            return None
        if book._desk.refill_wanted:  # topped up ahead, off this thread
            book._wake.set()
        return Held(self, leases, amounts, input_bound)


class Held:
    """What :meth:`AdmissionLane.admit` reserved for one call, until a ticket holds it."""

    __slots__ = ("lane", "leases", "amounts", "input_bound")

    def __init__(self, lane: AdmissionLane, leases: list[Lease], amounts: list[int],
                 input_bound: int) -> None:
        self.lane, self.leases, self.amounts = lane, leases, amounts
        self.input_bound = input_bound

    def attach(self, ticket: Any) -> Any:
        """Make ``ticket`` (the call's, built later with the same model, attribution and
        output limit) hold this reservation; returns it."""
        from ._budget_book import Reservation  # (a cycle at import time)

        ticket.reservations = [Reservation(window_id, budget, key, start, amount, leased=True)
                               for (budget, key, start, window_id), amount
                               in zip(self.lane._targets, self.amounts)]
        ticket.decision = "allow"
        ticket.input_bound = self.input_bound
        return ticket

    def give_back(self) -> None:
        """Return the reservation (no ticket will hold it)."""
        self.lane._book._desk.give_back(
            [((None, None, None, None, amount), lease)
             for lease, amount in zip(self.leases, self.amounts)])


def _allow_limit(budget: Any) -> int:
    """The most a window may hold (spent + reserved) for the full check to allow a call
    without a word: below the first level, and not below the downgrade hint's line."""
    return min(budget.level_amounts[0] - 1, budget.keep_amount)
