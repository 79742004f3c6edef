"""Adaptation step of the bundled SmolLM2: throughput, MFU, and the joint pass against two passes.

Both variants run side by side in one process, alternating, on the same real Wikipedia passages;
each figure is the median of the repeats. Results are printed and appended to BENCHMARKS.md.

    python bench/adapt_step.py --lengths 128 512 --batch-size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import append_report, machine, markdown_table

from llama2vec.collate import PretextCollator, excluded_target_ids
from llama2vec.config import ModelConfig, PromptConfig
from llama2vec.data import chunk_ids, wiki_documents
from llama2vec.losses import PretextModel, PretextWeights
from llama2vec.models import add_placeholder_tokens, load_causal_lm
from llama2vec.prompts import prompt_ids, resolve_prompt


def passages(tok, length: int, count: int) -> list[list[int]]:
    """`count` real Wikipedia windows of exactly `length` tokens."""
    out = []
    for doc in wiki_documents():
        for chunk in chunk_ids(doc.text, tok, 10 * length):
            ids = chunk
            while len(ids) >= length and len(out) < count + 1:
                out.append(ids[:length])
                ids = ids[length:]
        if len(out) > count:
            break
    return out


def step_flops(model, rows: int, seq_len: int, placeholders: int) -> float:
    """Training FLOPs of one step over `rows` sequences of `seq_len` tokens: 6 per non-embedding
    parameter per token, attention (QK^T and AV: 2 * 2 * L * d per token per layer forward, x3 with
    backward), and the LM head at the `placeholders` positions per row that the losses read."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    attn = 3 * 4 * seq_len * cfg.hidden_size * cfg.num_hidden_layers
    head = 6 * cfg.hidden_size * cfg.vocab_size * placeholders
    return rows * (seq_len * (6 * n + attn) + head)


def measure(lengths: list[int], batch_size: int, repeats: int, peak: float, device: str = "cpu") -> list[dict]:
    """Joint and two-pass steps side by side, alternating; median step time, tokens/s and MFU."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    tok, model, _ = load_causal_lm(ModelConfig(device=device, dtype=dtype))
    spec = resolve_prompt(PromptConfig())
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    excluded = excluded_target_ids(tok, ids)
    model.train()
    module = PretextModel(model, PretextWeights())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    head = len(ids.bos + ids.prefix)
    joint_len = head + len(ids.self_suffix) + len(ids.next_suffix)  # T once, both suffixes
    single_len = {"self": head + len(ids.self_suffix), "next": head + len(ids.next_suffix)}

    rows = []
    for length in lengths:
        texts = passages(tok, length, batch_size + 1)
        examples = [{"text": texts[i], "next": texts[i + 1]} for i in range(batch_size)]
        batches = {}
        for joint in (True, False):
            batch = PretextCollator(ids, tok.pad_token_id, excluded, length, joint=joint)(examples)
            batches[joint] = {k: v.to(device) for k, v in batch.items()}
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(repeats + 1):  # the first round warms up
            for joint in (True, False):
                sync(device)
                t = time.perf_counter()
                out = module(**batches[joint])
                out["loss"].backward()
                opt.step()
                opt.zero_grad()
                sync(device)
                if r:
                    times[joint].append(time.perf_counter() - t)
        tokens = batch_size * length
        for joint in (True, False):
            median = statistics.median(times[joint])
            # Useful work: one pass over T and both suffixes (joint), or T twice, once per suffix.
            if joint:
                flops = step_flops(model, batch_size, length + joint_len, 2 * ids.k)
            else:
                flops = sum(step_flops(model, batch_size, length + single_len[t], ids.k) for t in single_len)
            rows.append({"length": length, "mode": "joint" if joint else "two passes", "step_s": median,
                         "tokens_s": tokens / median, "mfu": flops / median / (peak * 1e9)})
        rows[-2]["speedup"] = rows[-1]["step_s"] / rows[-2]["step_s"]
    return rows


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from suite import matmul_peak

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    peak = matmul_peak()
    rows = measure(args.lengths, args.batch_size, args.repeats, peak)
    table = markdown_table(
        ["passage tokens", "mode", "step (s)", "passage tokens/s", "MFU", "joint speed-up"],
        [[str(r["length"]), r["mode"], f"{r['step_s']:.2f}", f"{r['tokens_s']:.0f}", f"{r['mfu']:.2f}",
          f"{r['speedup']:.2f}x" if "speedup" in r else ""] for r in rows])
    append_report(args.output, f"Adaptation step (SmolLM2-135M, batch {args.batch_size}, float32)",
                  f"python bench/adapt_step.py --lengths {' '.join(map(str, args.lengths))} "
                  f"--batch-size {args.batch_size} --repeats {args.repeats}",
                  f"{machine()}; measured float32 matmul peak {peak:.0f} GFLOP/s. Median of {args.repeats} steps "
                  "(forward, backward, AdamW) per mode, modes alternating.", table)


if __name__ == "__main__":
    main()
