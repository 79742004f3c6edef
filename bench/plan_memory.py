"""The dry run's memory plan against the peaks that runs reach, on CPU processes: SmolLM2 under the paper's
adaptation recipe on 2 processes (DDP, and --fsdp --fsdp-offload), and a 110 MiB random Llama on 4 x 160-token
rows in one process, with and without gradient checkpointing (where the activations weigh). Each run is planned by
`--dry-run` in a fresh process, then run for 2 steps; the measured peak is each process's `peak_rss_mib.end` from
`ranks/rank-R.json`, with glibc's mmap threshold fixed so that freed memory leaves the process. With `--device
cuda`, SmolLM2 on one GPU at 8 x 256 tokens (bf16-mixed; whole, and --fsdp --fsdp-offload in one process), against
the CUDA allocator's peak (`peak_gpu_mib.reserved`; the plan's 1 GiB runtime for the CUDA context left out of the
comparison). Appends a table to BENCHMARKS.md.

    python bench/plan_memory.py
    python bench/plan_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from report import append_report, machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["The committee approved the new budget after a long debate on Tuesday.",
             "Researchers found that the river's fish population doubled in five years.",
             "The film festival opened with a documentary about mountain villages."]


def run(args: list[str], processes: int, **env: str) -> str:
    head = [sys.executable, "-m", "llama2vec"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "llama2vec"]
    proc = subprocess.run([*head, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout


def plan_and_measure(args: list[str], processes: int, out: Path) -> tuple[float, float, list[float]]:
    """(planned peak MiB, planned activations MiB, measured peaks MiB of each process: resident memory on a CPU,
    the CUDA allocator's peak plus the plan's runtime on a GPU)."""
    env = {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "RANK": "0", "LOCAL_RANK": "0"}
    shown = run([*args, "--dry-run"], 1, **(env if processes > 1 else {}))
    planned = float(re.search(r"peak \(held \+ the larger phase\) +([\d.]+) GiB", shown).group(1)) * 1024
    activations = float(re.search(r"activations +([\d.]+) GiB", shown).group(1)) * 1024
    run(args, processes, MALLOC_MMAP_THRESHOLD_="65536")
    reports = [json.loads(p.read_text()) for p in sorted((out / "ranks").iterdir())]
    runtime = float(re.search(r"runtime +([\d.]+) GiB", shown).group(1)) * 1024
    peaks = [r["peak_gpu_mib"]["reserved"] + runtime if "peak_gpu_mib" in r else r["peak_rss_mib"]["end"]
             for r in reports]
    return planned, activations, peaks


def sized_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                  num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "wiki.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": " ".join(SENTENCES * 40)})
                                  + "\n" for i in range(4)))
        recipe = ["adapt", "--config", str(ROOT / "configs" / "paper" / "adapt-llama2-7b.yaml"), "--model", "smollm2",
                  "--device", "cpu", "--corpus", str(corpus), "--max-steps", "2", "--batch-size", "1",
                  "--grad-accum", "2", "--max-length", "32", "--save-steps", "1"]
        if args.device == "cuda":
            gpu = list(recipe)
            for flag, value in (("--device", "cuda"), ("--batch-size", "8"), ("--max-length", "256")):
                gpu[gpu.index(flag) + 1] = value
            cases = [("SmolLM2, recipe, 8 x 256 tokens, 1 GPU", gpu, 1, []),
                     ("the same, --fsdp --fsdp-offload in one process", gpu, 1, ["--fsdp", "--fsdp-offload"])]
        else:
            cases = [("SmolLM2, recipe, 2 processes, DDP", recipe, 2, []),
                     ("SmolLM2, recipe, 2 processes, --fsdp --fsdp-offload", recipe, 2, ["--fsdp", "--fsdp-offload"])]
            model = sized_model(tmp / "sized")
            small = ["adapt", "--model", str(model), "--device", "cpu", "--corpus", str(corpus), "--max-steps", "2",
                     "--batch-size", "4", "--max-length", "128", "--precision", "fp32", "--save-steps", "0"]
            cases += [("110 MiB Llama, 4 x 160 tokens, 1 process", small, 1, []),
                      ("the same, --gradient-checkpointing", small, 1, ["--gradient-checkpointing"])]
        for i, (name, base, processes, extra) in enumerate(cases):
            out = tmp / f"run{i}"
            planned, activations, peaks = plan_and_measure([*base, *extra, "--output", str(out)], processes, out)
            worst = max(peaks, key=lambda p: abs(planned - p))
            rows.append([name, f"{planned:.0f}", f"{activations:.0f}", ", ".join(f"{p:.0f}" for p in peaks),
                         f"{(planned - worst) / worst:+.1%}"])
            print(rows[-1], flush=True)
    where = "GPU" if args.device == "cuda" else "CPU processes"
    note = ("measured: the CUDA allocator's peak plus the plan's 1 GiB runtime" if args.device == "cuda" else
            "peaks with MALLOC_MMAP_THRESHOLD_=65536")
    append_report(args.output, f"The dry run's memory plan against measured peaks ({where})",
                  f"python bench/plan_memory.py --device {args.device}", f"{machine(args.device)}; {note}",
                  markdown_table(["run", "planned peak MiB", "of which activations", "measured peak MiB (each process)",
                                  "plan vs farthest"], rows))


if __name__ == "__main__":
    main()
