"""Benchmark runners (``gla bench ...``): each prints a table of ours vs references measured in one run."""

import json
import os
import time


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


def sync(device) -> None:
    """Wait for the device's queued work (timings on a GPU would otherwise measure only the launches)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds that fn() takes, the device's work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t
