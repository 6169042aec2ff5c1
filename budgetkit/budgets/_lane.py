"""Admission lanes: the budget check of a busy adapter, without building a ticket first.

An adapter that admits many calls of the same model and attribution (a LangChain handler
of one user's chain, say) does the same work for each: find the budget windows the call
counts in, price its worst case, take it from this process's leases. The windows and the
price are the same from call to call; only the prompt's size and the output limit
change. A lane remembers the first two, made from a ticket admitted the ordinary way:

    ticket = engine.admit(model, messages=..., user_id="alice")  # the full check
    lane = engine.lane(ticket)  # None: calls like it cannot be admitted in memory
    ...
    bound = engine.prompt_bound(model, messages=...)  # the next call like it
    held = lane.admit(bound, max_output_tokens) if bound is not None else None
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
tokens (bytes of text are enough: see :func:`budgetkit.pricing._tokens.message_tokens_bound`), so
what a lane reserves is never less than the full check would.

A lane takes room from the leases for ``LANE_CALLS`` calls like the one asking at once
(its *credit*, counted in flight in each lease like a call's worst case), so most admits
only subtract from the credit: no lease is touched, nor the engine clock read when it is
the wall clock. Credit is for a short while only: every trip of the leases to the database
(a top-up, the sync every second, a flush) returns all lanes' unused credit first, so it
never outlives what the database holds, nor keeps room from other processes for long.
Near a level a lane takes room for one call at a time, as without credit.
"""

from __future__ import annotations

import operator
import time
from typing import Any

from budgetkit.pricing import PICOS_PER_NANO, token_count

from ._budget import Budget
from ._lease import Lease
from ._reservation import Reservation

__all__ = ["AdmissionLane", "LaneReservation", "Lanes", "LANE_CALLS"]

_HALF_NANO = PICOS_PER_NANO // 2  # cost_nanos rounds half up


#: Calls like the one asking that a lane takes room for at once (see the module docs).
LANE_CALLS = 16


class AdmissionLane:
    """The windows and price of calls like one admitted ticket (same model, provider,
    user, project, operation and tags), and the credit taken for them."""

    __slots__ = ("_book", "_desk", "_budgets", "_valid_from", "_valid_until", "_targets",
                 "_input_picos", "_output_picos", "_usd", "_all_usd", "_default_output",
                 "_limits", "_wall", "credit", "leases", "_until", "_until_mono")

    def __init__(self, book: Any, budgets: Any, valid: tuple[Any, Any],
                 targets: list[tuple[Any, ...]], price: Any, default_output: int,
                 wall_clock: bool) -> None:
        self._book = book
        self._desk = book._desk
        self._budgets = budgets  # the registry the targets were found in
        self._valid_from, self._valid_until = valid
        self._targets = targets
        self._input_picos, self._output_picos = price.input_picos, price.output_picos
        self._usd = tuple(budget.unit == "usd" for budget, *_rest in targets)
        self._all_usd = all(self._usd)  # the usual case, priced in one step
        self._default_output = default_output
        # Below these (spent + reserved after the call) the full check would say "allow".
        self._limits = tuple(_allow_limit(budget) for budget, *_rest in targets)
        self._wall = wall_clock  # the engine clock is the wall clock: time.monotonic will do
        #: unused room per target, taken from ``leases`` (changed under the desk's lock)
        self.credit: list[int] = [0] * len(targets)
        self.leases: list[Lease] = []
        self._until: Any = None  # engine clock: the credit may be used before this
        self._until_mono = 0.0  # the same on time.monotonic (wall clock only)

    def admit(self, input_bound: int,
              max_output_tokens: int | None = None) -> LaneReservation | None:
        """Take a call's worst case from the lane's credit, or else from the leases of
        every window; None: nothing taken, admit the call the ordinary way."""
        output = self._default_output if max_output_tokens is None else max_output_tokens
        if type(output) is not int or output < 0 or type(input_bound) is not int \
                or input_bound < 0:  # a NaN here would reserve nothing and admit anything
            output = token_count("max_output_tokens", output)
            input_bound = token_count("input_bound", input_bound)
        # price.cost_nanos(input_bound, output), without its argument checks
        nanos = (input_bound * self._input_picos + output * self._output_picos
                 + _HALF_NANO) // PICOS_PER_NANO
        amounts = ([nanos] * len(self._targets) if self._all_usd
                   else [nanos if usd else input_bound + output for usd in self._usd])
        if self._book._budgets is self._budgets and (
                time.monotonic() < self._until_mono if self._wall
                else self._until is not None and self._book.clock() < self._until):
            with self._desk._lock:
                credit = self.credit
                if all(map(operator.ge, credit, amounts)):
                    self.credit = list(map(operator.sub, credit, amounts))
                    return LaneReservation(self, self.leases, amounts, input_bound)
        return self._admit_from_leases(amounts, input_bound)

    def _admit_from_leases(self, amounts: list[int],
                           input_bound: int) -> LaneReservation | None:
        book = self._book
        if book._budgets is not self._budgets:
            return None  # budgets were added or removed since
        now = book.clock()
        if not self._valid_from <= now < self._valid_until \
                or book._next_reap is None or now >= book._next_reap:
            return None  # a new window, or an expired-reservation sweep is due
        desk = self._desk
        chunk = [amount * LANE_CALLS for amount in amounts]
        leases = desk.take_all(self._targets, chunk, now, self._limits, hint=amounts)
        if leases is not None:  # this call, and credit for the next ones
            # Usable until the first of the windows ends or of the leases expires.
            until = min([self._valid_until, *(lease.expires for lease in leases)])
            until_mono = time.monotonic() + (until - now).total_seconds()
            with desk._lock:
                self.return_credit()  # what is left of the last (another thread's) credit
                self.credit = [amount * (LANE_CALLS - 1) for amount in amounts]
                self.leases = leases
                self._until, self._until_mono = until, until_mono
                desk.lanes_with_credit[self] = None
        else:  # near a level, or leases short of room: this call only, if it fits
            leases = desk.take_all(self._targets, amounts, now, self._limits)
            if leases is None:
                return None
        if desk.refill_wanted:  # topped up ahead, off this thread
            book._wake.set()
        return LaneReservation(self, leases, amounts, input_bound)

    def return_credit(self) -> None:
        """Give the unused credit back to the leases. The caller holds the desk's lock."""
        for lease, amount in zip(self.leases, self.credit):
            lease.inflight -= amount
        self.forget_credit()

    def forget_credit(self) -> None:
        """Drop the credit without returning it (a forked child: the leases are gone)."""
        self.credit = [0] * len(self.credit)
        self._until_mono, self._until = 0.0, None


class LaneReservation:
    """What :meth:`AdmissionLane.admit` reserved for one call, until a ticket holds it."""

    __slots__ = ("lane", "leases", "amounts", "input_bound")

    def __init__(self, lane: AdmissionLane, leases: list[Lease], amounts: list[int],
                 input_bound: int) -> None:
        self.lane, self.leases, self.amounts = lane, leases, amounts
        self.input_bound = input_bound

    def attach(self, ticket: Any) -> Any:
        """Make ``ticket`` (the call's, built later with the same model, attribution and
        output limit) hold this reservation; returns it."""
        ticket.reservations = [Reservation(window_id, budget, key, start, amount, leased=True)
                               for (budget, key, start, window_id), amount
                               in zip(self.lane._targets, self.amounts)]
        ticket.decision = "allow"
        ticket.input_bound = self.input_bound
        return ticket

    def give_back(self) -> None:
        """Return the reservation (no ticket will hold it)."""
        with self.lane._desk._lock:
            for lease, amount in zip(self.leases, self.amounts):
                lease.inflight -= amount


class Lanes:
    """An adapter's admission lanes, by a key of its own choosing that stands for what
    decides a call's budget windows (model, provider, user, project, operation, tags).
    Bounded: when ``maxsize`` keys are held (a new user or tag per call: lanes are not
    reused), it starts afresh."""

    __slots__ = ("_engine", "_lanes", "_maxsize")

    def __init__(self, engine: Any, maxsize: int = 1024) -> None:
        self._engine = engine
        self._lanes: dict[Any, AdmissionLane] = {}
        self._maxsize = maxsize

    def get(self, key: Any) -> AdmissionLane | None:
        """The lane of calls like ``key``'s, if one is known (None for unhashable keys)."""
        try:
            return self._lanes.get(key)
        except TypeError:  # an unhashable attribution value: no lane
            return None

    def remember(self, key: Any, ticket: Any) -> None:
        """After ``ticket`` was admitted in full: the lane of calls like it, from now on."""
        lane = self._engine.lane(ticket)
        try:
            if lane is None:
                self._lanes.pop(key, None)
                return
            if len(self._lanes) >= self._maxsize:
                self._lanes.clear()
            self._lanes[key] = lane
        except TypeError:
            pass


def _allow_limit(budget: Budget) -> int:
    """The most a window may hold (spent + reserved) for the full check to allow a call
    without a word: below the first level, and not below the downgrade hint's line."""
    return min(budget.level_amounts[0] - 1, budget.keep_amount)
