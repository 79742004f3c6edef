"""Training throughput through the command line, as users run it: `adapt` (joint pass and two passes) and a
`finetune` step in each precision asked for, with each attention kernel asked for where the stage takes it,
and, with several GPUs, a short `--fsdp` run under torchrun. Reads tokens/s from each run's log.jsonl (median
over the steps after the first) and appends a table to BENCHMARKS.md.

    python bench/train_runs.py --device cuda --precision bf16-mixed bf16 --attn sdpa flash_attention_2
    python bench/train_runs.py --device cpu --steps 3 --length 64     # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import append_report, machine, markdown_table


def llama2vec(*args: str, processes: int = 1) -> None:
    head = [sys.executable, "-m", "llama2vec"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "llama2vec"]
    proc = subprocess.run([*head, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                          if processes > 1 else None)
    if proc.returncode != 0:
        raise RuntimeError(f"llama2vec {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def tokens_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[1:] or records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed"])
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="Kernels; flash_attention_2 where installed.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--gpus", type=int, default=None, help="Processes of the --fsdp run (default: every GPU).")
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()
    kernels = [a for a in args.attn if a != "flash_attention_2" or importlib.util.find_spec("flash_attn")]
    gpus = args.gpus if args.gpus is not None else (
        __import__("torch").cuda.device_count() if args.device == "cuda" else 0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        llama2vec("data", "wiki", "--output", str(work / "wiki.jsonl"))
        llama2vec("data", "bbc", "--output", str(work / "bbc"), "--negatives", "7")
        common = ["--model", "smollm2", "--device", args.device, "--max-steps", str(args.steps), "--logging-steps",
                  "1", "--save-steps", "0", "--batch-size", str(args.batch_size)]
        adapt = ["adapt", *common, "--corpus", str(work / "wiki.jsonl"), "--max-length", str(args.length),
                 "--full"]
        finetune = ["finetune", *common, "--train", str(work / "bbc" / "train.jsonl"), "--group-size", "8",
                    "--passage-max-length", str(args.length), "--full"]
        runs = []
        for precision in args.precision:
            runs.append(("adapt, joint pass", precision, "sdpa", [*adapt, "--precision", precision], 1))
            runs.append(("adapt, two passes", precision, "sdpa", [*adapt, "--precision", precision, "--no-joint"], 1))
            for kernel in kernels:
                runs.append(("finetune", precision, kernel,
                             [*finetune, "--precision", precision, "--attn-implementation", kernel], 1))
        if gpus >= 2:
            runs.append((f"adapt --fsdp, {gpus} processes", args.precision[0], "sdpa",
                         [*adapt, "--precision", args.precision[0], "--fsdp"], gpus))
        for i, (name, precision, kernel, cmd, processes) in enumerate(runs):
            out = work / f"run{i}"
            llama2vec(*cmd, "--output", str(out), processes=processes)
            rows.append([name, precision, kernel, f"{tokens_per_s(out):,.0f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["run", "precision", "attention", "passage tokens/s"], rows)
    append_report(args.output, "Training runs through the command line (SmolLM2-135M)",
                  f"python bench/train_runs.py --device {args.device} --precision {' '.join(args.precision)} "
                  f"--attn {' '.join(args.attn)} --steps {args.steps}",
                  f"{machine(args.device)}; batch {args.batch_size}, passages of {args.length} tokens, all weights; "
                  f"median tokens/s over steps 2-{args.steps} of each run's log.jsonl", table)


if __name__ == "__main__":
    main()
