"""The demo's time estimate against its measured time, and the per-stage factors behind it.

    python bench/demo_estimate.py runs/demo-bf16/report.json runs/demo-fp32/report.json [--append]

Each report (a finished `llama2vec demo` run, from a fresh folder) holds its stage timings and the speed that
its probe measured at the start (`time_estimate.tokens_per_s`). For each one this prints the work per stage in
tokens, the factor that turns the probe's seconds per token into the stage's (the constants `_ADAPT_PER_PROBE`,
`_FINETUNE_PER_PROBE` and `_ENCODE_PER_PROBE` of `llama2vec.demo` are set from these), and the estimate against
the measured time. `--append` adds the table to BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from llama2vec import demo as d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine  # noqa: E402


def row(path: Path) -> dict:
    report = json.loads(path.read_text())
    est = report.get("time_estimate")
    if not est:
        raise SystemExit(f"{path}: no time_estimate (a report of an older version)")
    fields = {f.name for f in dataclasses.fields(d.DemoSettings)}
    s = d.DemoSettings(**{k: v for k, v in report["settings"].items() if k in fields})
    s = dataclasses.replace(s, recipes=[d.Recipe(**report["settings"]["recipe"])])
    rates = d.Rates(**{k: 1 / v for k, v in est["tokens_per_s"].items()})
    n_dev = (sum(1 for _ in (path.parent / "data" / "dev" / "corpus.jsonl").open()),
             sum(1 for _ in (path.parent / "data" / "dev" / "queries.jsonl").open()))
    work = d.estimate_work(s, report["settings"]["eval_passages"], report["settings"]["eval_queries"], n_dev)
    t = report["timings"]
    encode_s = work["encode"] * rates.encode + work["encode_fp32"] * rates.encode_fp32
    return {"report": str(path), "path": f"{s.precision} / {s.backend}",
            "adapt": t["adapt"] / (work["adapt"] * rates.train),
            "finetune": (t["finetune"] + t.get("choose_recipe", 0)) / (work["finetune"] * rates.train),
            "encode": (t["choose_encoding"] + t["evaluate"] + t.get("mine", 0) + t.get("label_curve", 0)) / encode_s,
            "estimate": est["seconds"], "measured": est["measured_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--append", action="store_true", help="Append the table to BENCHMARKS.md.")
    args = parser.parse_args()
    rows = [row(p) for p in args.reports]
    lines = ["| report | path | adapt factor | fine-tune factor | encode factor | estimate (s) | measured (s) | "
             "estimate / measured |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['report']} | {r['path']} | {r['adapt']:.2f} | {r['finetune']:.2f} | {r['encode']:.2f} | "
              f"{r['estimate']:.0f} | {r['measured']:.0f} | {r['estimate'] / r['measured']:.2f} |" for r in rows]
    print("\n".join(lines))
    print(f"constants in use: adapt {d._ADAPT_PER_PROBE}, fine-tune {d._FINETUNE_PER_PROBE}, encode "
          f"{d._ENCODE_PER_PROBE}, fixed {d._FIXED_S} s")
    if args.append:
        head = (f"\n## The demo's time estimate\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                f"`python bench/demo_estimate.py {' '.join(map(str, args.reports))}`; {machine()}, "
                f"Python {sys.version.split()[0]}. Factors: a stage's measured seconds over "
                "its work in tokens times the probe's seconds per token.\n\n")
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as fh:
            fh.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
