"""Report: what the user sees and keeps: progress on stderr, tables, report.json / report.md, plots.

May import: base."""
