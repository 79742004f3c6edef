"""Shared by the benchmarks: the machine line and appending a dated section to BENCHMARKS.md."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path


def machine(device: str = "cpu") -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def append_report(output: str, title: str, command: str, description: str, table: str) -> str:
    """Print and append `## title`, the date, the command and a description, then the table."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = f"\n## {title}\n\n{stamp}; `{command}`; {description}\n\n{table}"
    print(report)
    with open(output, "a") as fh:
        fh.write(report)
    return report
