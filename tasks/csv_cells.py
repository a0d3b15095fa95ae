"""CSV for people to open: every text cell a spreadsheet would run as a formula made inert.

Its own module, apart from tasks/report.py, so that batch scoring writes its CSVs
without importing the report's plotting and templates (matplotlib, Jinja).
"""
from __future__ import annotations

from pathlib import Path
from typing import IO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write_csv(table, path: Path | IO) -> None:
    """Write a table (a pandas DataFrame) as CSV with every text cell a spreadsheet would run as a formula made inert.

    Class names and file paths come from the dataset: a cell starting with =, +,
    -, @, a tab or a carriage return is a formula to Excel and LibreOffice, so it
    gets a leading ' (shown as text, not run).
    """
    inert = table.copy()
    for column in inert.select_dtypes(exclude=["number", "bool"]).columns:
        inert[column] = inert[column].map(_inert_cell)
    inert.to_csv(path, index=False, float_format="%.6f")


def _inert_cell(value):
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
