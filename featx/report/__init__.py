"""The report: results read and ranked (:mod:`~featx.report.ranking`), then written as tables
and plots (:mod:`~featx.report.write`): report.md and report.csv, and the self-contained
report.html (:mod:`~featx.report.html`)."""
from featx.report.html import write_html
from featx.report.ranking import (
                                  COMPARABLE_RULE,
                                  RANK_RULE,
                                  WALL_TIME_RULE,
                                  load_results,
                                  rank_results,
)
from featx.report.write import REPORT_COLUMNS, format_table, write_report

__all__ = ["COMPARABLE_RULE", "RANK_RULE", "REPORT_COLUMNS", "WALL_TIME_RULE", "format_table",
           "load_results", "rank_results", "write_html", "write_report"]
