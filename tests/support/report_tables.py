"""Reading memora-batch's reports back as a reader would: every table of report.md and report.html, as
(header, rows) with the number of columns each line really has (the tests check that none is wider than 8)."""

from __future__ import annotations

from html.parser import HTMLParser


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each markdown table (consecutive lines starting with '|') as its rows of cells, the separator row left out."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} and c for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.row, self.cell, self.depth = [], None, None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None:
            self.row.append(self.cell or "")
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables[-1].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_tables(text: str) -> list[list[list[str]]]:
    p = _Tables()
    p.feed(text)
    return p.tables


def widest(tables: list[list[list[str]]]) -> int:
    return max((len(row) for t in tables for row in t), default=0)
