"""What the ledger says: summaries, daily series, cost analysis, budget reports,
forecasts, anomalies and exports.

Reads the ledger and budget tables; above the engine, below the server and the CLI.
"""

from __future__ import annotations

from ._budgets import alert_rows as alert_rows
from ._budgets import approval_rows as approval_rows
from ._budgets import as_plain as as_plain
from ._budgets import budget_report as budget_report
from ._budgets import budget_rows as budget_rows
from ._cost_analysis import CostAnalysis as CostAnalysis
from ._cost_analysis import Recommendation as Recommendation
from ._cost_analysis import WhatIf as WhatIf
from ._cost_analysis import cost_analysis as cost_analysis
from ._cost_analysis import what_if as what_if
from ._export import EXPORT_COLUMNS as EXPORT_COLUMNS
from ._export import EXPORT_FORMATS as EXPORT_FORMATS
from ._export import export_usage as export_usage
from ._forecast import Anomaly as Anomaly
from ._forecast import Forecast as Forecast
from ._forecast import detect_anomalies as detect_anomalies
from ._forecast import forecast as forecast
from ._periodic import periodic_report as periodic_report
from ._reports import Period as Period
from ._reports import UsageGroup as UsageGroup
from ._reports import UsageSummary as UsageSummary
from ._reports import allocate_costs as allocate_costs
from ._reports import as_source as as_source
from ._reports import cost_series as cost_series
from ._reports import fill_series as fill_series
from ._reports import summarize as summarize
from ._reports import summarize_many as summarize_many

__all__ = ['Period', 'UsageGroup', 'UsageSummary', 'summarize', 'summarize_many',
           'cost_series', 'allocate_costs', 'as_source', 'fill_series', 'Recommendation',
           'CostAnalysis', 'WhatIf', 'cost_analysis', 'what_if', 'budget_rows', 'alert_rows',
           'approval_rows', 'as_plain', 'budget_report', 'periodic_report', 'Forecast',
           'Anomaly', 'forecast', 'detect_anomalies', 'export_usage', 'EXPORT_COLUMNS',
           'EXPORT_FORMATS']
