"""May this call run? Budgets by scope x period x unit with graded levels, reservations
held in the ledger, leases and admission lanes for cheap repeat admits, approvals and alerts;
budget definitions stored in the ledger so every engine on it enforces them.

Built on :mod:`budgetkit.ledger` and :mod:`budgetkit.pricing`.
"""

from __future__ import annotations

from ._alerts import Alert as Alert
from ._alerts import AlertSink as AlertSink
from ._alerts import LoggingSink as LoggingSink
from ._alerts import WebhookSink as WebhookSink
from ._book import DEFAULT_RESERVATION_TIMEOUT as DEFAULT_RESERVATION_TIMEOUT
from ._book import BudgetBook as BudgetBook
from ._book import attribution_ticket as attribution_ticket
from ._budget import PERIODS as PERIODS
from ._budget import SCOPES as SCOPES
from ._budget import UNITS as UNITS
from ._budget import Budget as Budget
from ._budget import BudgetLevels as BudgetLevels
from ._budget import parse_budget as parse_budget
from ._budget import window_bounds as window_bounds
from ._files import load_budgets as load_budgets
from ._lane import AdmissionLane as AdmissionLane
from ._lane import LaneReservation as LaneReservation
from ._lane import Lanes as Lanes
from ._lease import LEASE_AFTER as LEASE_AFTER
from ._presets import model_token_budgets as model_token_budgets
from ._presets import seed_budgets as seed_budgets
from ._presets import token_ladder_budgets as token_ladder_budgets
from ._reservation import Reservation as Reservation
from ._shared import POLL_INTERVAL as POLL_INTERVAL
from ._shared import SharedBudgets as SharedBudgets
from ._status import Approval as Approval
from ._status import BudgetStatus as BudgetStatus
from ._tables import BudgetAlertRow as BudgetAlertRow
from ._tables import BudgetApprovalRow as BudgetApprovalRow
from ._tables import BudgetDefinitionRow as BudgetDefinitionRow
from ._tables import BudgetRegistryRow as BudgetRegistryRow
from ._tables import BudgetReservationRow as BudgetReservationRow
from ._tables import BudgetWindowRow as BudgetWindowRow

__all__ = ['Alert', 'AlertSink', 'LoggingSink', 'WebhookSink', 'BudgetBook', 'Reservation',
           'attribution_ticket', 'DEFAULT_RESERVATION_TIMEOUT', 'BudgetStatus', 'Approval',
           'Budget', 'BudgetLevels', 'PERIODS', 'SCOPES', 'UNITS', 'window_bounds',
           'load_budgets', 'parse_budget', 'AdmissionLane', 'LaneReservation', 'Lanes',
           'token_ladder_budgets', 'model_token_budgets', 'seed_budgets', 'BudgetWindowRow',
           'BudgetReservationRow', 'BudgetApprovalRow', 'BudgetAlertRow',
           'BudgetDefinitionRow', 'BudgetRegistryRow', 'SharedBudgets', 'POLL_INTERVAL',
           'LEASE_AFTER']
