"""Benchmark runners (``gla bench ...``): each prints a table of ours vs references measured in one run."""

import json
import os


def md_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table: a header of ``columns`` and one line per row of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(out: str, stem: str, markdown: str, data=None) -> None:
    """Write OUT/STEM.md (the table as printed) and, when ``data`` is given, OUT/STEM.json (the raw rows)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    if data is not None:
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            json.dump(data, f, indent=1)
