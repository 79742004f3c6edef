"""`adapt --dry-run` and `finetune --dry-run`: what a launch needs, resolved without training or writing anything.

The plan builds the model on the meta device (its real architecture, with the placeholder rows and the LoRA
adapters the run adds; no storage) and prices each process's memory part by part:

- weights, gradients and AdamW's two states, in the weights' dtype: whole on every process without --fsdp, 1/N of
  each under --fsdp, in CPU memory under --fsdp-offload;
- DDP's gradient buckets: one more copy of the trainable gradients, from 2 processes on;
- FSDP's gathered units: the root (embeddings, last layer, final norm, LM head) stays gathered through a step,
  with its gradients and their float32 copy for the reduction; two decoder layers are gathered at a time;
- bf16-mixed without FSDP: autocast's bfloat16 copies of the linear weights, kept for the backward pass;
- the activations of one micro-batch at the longest rows it can hold, per decoder layer and token
  2(r + 4)h + c(4h + 2kv + 4i) bytes (r: the residual stream's bytes, c: the compute dtype's; h, kv, i: the
  hidden, key-value and MLP widths), plus the attention probabilities (c heads L) under eager attention; under
  gradient checkpointing the layer inputs alone, plus one layer recomputed; and the LM head's logits;
- the runtime: on a CPU this process's own resident memory once the code is loaded (measured as the plan runs);
  on a GPU the CUDA context and kernels (1 GiB, assumed).

A plan fits when each process needs at most 90% of its device's memory (on a CPU, the processes of a machine
share its available memory); the rest is left to the allocator. The time: 6 FLOPs per weight and token (4 for a
frozen weight under LoRA, 2 more under gradient checkpointing) plus attention, at 40% of the device's rate
(measured here by a matmul, or given with --plan-gpu-tflops).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import DataConfig, ModelConfig, PretextConfig, TrainConfig
from .errors import Llama2VecError

GIB = 2**30
CUDA_RUNTIME = 1.0 * GIB  # CUDA context, cuBLAS workspaces and kernels (assumed)
USABLE = 0.9  # share of a device's memory a plan may fill
UTILISATION = 0.4  # share of a device's peak FLOP rate that training reaches (assumed)
SAMPLE_DOCUMENTS = 200
WHOLE = "whole model read by the main process"  # documents of a corpus chunked to estimate its pairs


@dataclass
class Shape:
    """What the plan needs of the model, read off the meta-device model."""

    params: int  # distinct parameters (a tied LM head counted once)
    trainable: int
    param_bytes: int  # in the dtypes the run holds them (LoRA adapters in float32 over bfloat16 weights)
    trainable_bytes: int
    largest_trainable: int  # bytes of the largest trainable tensor
    layers: int
    layer_params: int  # one decoder layer
    root_params: int  # FSDP's root unit: everything but the first layers-1 decoder layers
    linear_params: int  # weights of linear layers (autocast copies them to bfloat16)
    layer_matmul_params: int  # linear weights inside the decoder layers (the FLOPs)
    frozen_matmul_params: int  # of those, the frozen ones (LoRA)
    hidden: int
    intermediate: int
    heads: int
    kv_width: int  # key-value heads x head size
    head_width: int  # attention heads x head size
    vocab: int


@dataclass
class Work:
    """One micro-batch of one process: the forward passes it runs, held together until the backward."""

    passes: list[tuple[int, int]]  # (rows, tokens per row) of each pass
    logit_positions: int  # positions whose LM-head logits are computed
    lm_positions: int = 0  # positions with a language-modelling loss (full-vocabulary logits, float32)

    @property
    def tokens(self) -> int:
        return sum(rows * length for rows, length in self.passes)


@dataclass
class Target:
    device: str  # "cuda" or "cpu"
    world: int
    per_node: int
    memory: float  # bytes of one GPU, or of a CPU machine's available memory (shared by its processes)
    host: float | None  # bytes of CPU memory per node, where known
    rate: float | None  # FLOP/s of one device at its peak in the training dtype
    rate_note: str
    runtime: float  # bytes a process holds before the model: its code, or the CUDA context
    here: bool  # planned for the processes this command runs on
    ranks: list[tuple[int, int, int, str]] = field(default_factory=list)  # (rank, node, local rank, device)


# --------------------------------------------------------------------------------------------
# The model's shape


def model_shape(model_cfg: ModelConfig, path: str, dtype: torch.dtype, new_tokens: list[str], tokenizer, lora: bool,
                lora_r: int, frozen_head: bool = False) -> Shape:
    """Build the model on the meta device as the run will (placeholder rows, LoRA adapters) and measure it."""
    from .losses import unwrap_lm
    from .models import add_placeholder_tokens, apply_lora, load_empty_lm

    lm = load_empty_lm(model_cfg, path, dtype)
    if tokenizer is not None:
        placeholder_ids = add_placeholder_tokens(tokenizer, lm, new_tokens)
    else:  # no tokenizer to ask: every placeholder counted as new
        rows = lm.get_input_embeddings().weight.shape[0]
        lm.resize_token_embeddings(rows + len(new_tokens), mean_resizing=False)
        placeholder_ids = list(range(rows, rows + len(new_tokens)))
    head = lm.get_output_embeddings()
    if frozen_head and head is not None and head.weight is not lm.get_input_embeddings().weight:
        head.weight.requires_grad_(False)
    if lora:
        lm = apply_lora(lm, lora_r, 1, 0.0, placeholder_ids)
    base = unwrap_lm(lm)
    decoder = base.get_decoder()
    layers = list(getattr(decoder, "layers", None) or getattr(decoder, "h", None) or [])
    if not layers:
        raise Llama2VecError(f"--dry-run: no decoder layer list found in {type(decoder).__name__}")
    config = base.config

    def count(params, size: bool = False) -> int:
        return sum(p.numel() * (p.element_size() if size else 1) for p in {id(p): p for p in params}.values())

    in_layers = {id(p) for layer in layers[:-1] for p in layer.parameters()}
    linears = [m for m in lm.modules() if isinstance(m, nn.Linear)]
    layer_linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        params=count(lm.parameters()),
        trainable=count(p for p in lm.parameters() if p.requires_grad),
        param_bytes=count(lm.parameters(), size=True),
        trainable_bytes=count((p for p in lm.parameters() if p.requires_grad), size=True),
        largest_trainable=max((p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad), default=0),
        layers=len(layers),
        layer_params=max(count(layer.parameters()) for layer in layers),
        root_params=count(p for p in lm.parameters() if id(p) not in in_layers),
        linear_params=count(m.weight for m in linears),
        layer_matmul_params=count(m.weight for m in layer_linears),
        frozen_matmul_params=count(m.weight for m in layer_linears if not m.weight.requires_grad),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        heads=heads,
        kv_width=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        head_width=heads * head_dim,
        vocab=lm.get_input_embeddings().weight.shape[0],
    )


# --------------------------------------------------------------------------------------------
# Memory


def dtype_bytes(precision: str, fsdp: bool) -> tuple[int, int, int]:
    """(weights' bytes, compute bytes, residual stream's bytes) of a precision."""
    if precision == "fp32":
        return 4, 4, 4
    if precision == "bf16":
        return 2, 2, 2
    return 4, 2, 2 if fsdp else 4  # bf16-mixed: float32 weights; under FSDP every gathered weight is bfloat16


def activation_bytes(shape: Shape, work: Work, precision: str, fsdp: bool, checkpointing: bool,
                     eager: bool) -> float:
    _, c, r = dtype_bytes(precision, fsdp)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    per_token = 2 * (r + 4) * h + c * (4 * h + 2 * kv + 4 * i)  # one decoder layer
    total = 0.0
    for rows, length in work.passes:
        layer = rows * length * (per_token + (c * shape.heads * length if eager else 0))
        masks = rows * length * length * (4 + 1)  # the additive mask and the boolean pattern
        if checkpointing:
            total += rows * length * r * h * shape.layers + 2 * layer + masks
        else:
            total += layer * shape.layers + masks
        total += rows * length * 2 * (r + 4) * h  # embeddings' output and the final norm
    total += work.logit_positions * shape.vocab * (c + 8)  # logits, their float32 copy and gradient
    return total


def rank_memory(shape: Shape, work: Work, cfg: TrainConfig, precision: str, world: int, eager: bool,
                runtime: float, device_type: str) -> tuple[dict[str, float], dict[str, float]]:
    """({part: bytes} on one process's device, {part: bytes} of that process in CPU memory besides, the main
    process's whole copy of the model under --fsdp included). On a CPU, --fsdp-offload's parts count as the
    device's: they are the same memory."""
    w, c, _ = dtype_bytes(precision, cfg.fsdp)
    trained = shape.trainable_bytes  # gradients and AdamW's states take the dtype of their weights
    state = dict(weights=shape.param_bytes, gradients=trained, optimizer=2 * trained)
    device: dict[str, float] = {"runtime": runtime}
    host: dict[str, float] = {}
    # AdamW's step: on a GPU torch's foreach kernels take a temporary as large as the trainable weights (held by
    # this process), on a CPU one parameter at a time.
    on_cpu = device_type == "cpu"
    step = shape.largest_trainable if on_cpu or cfg.fsdp_offload else trained / (world if cfg.fsdp else 1)
    if cfg.fsdp:
        sharded = {k: v / world for k, v in state.items()}
        offloaded = cfg.fsdp_offload and not on_cpu
        (host if offloaded else device).update({f"{k} (1/{world})": v for k, v in sharded.items()})
        gathered_c = c if precision == "bf16-mixed" else w
        device["gathered units"] = (shape.root_params * (2 * gathered_c + 4) + 2 * shape.layer_params * gathered_c
                                    + shape.layer_params * (gathered_c + 4))
        host[WHOLE] = shape.param_bytes  # before it sends the shards
    else:
        device.update(state)
        if world > 1:
            device["DDP buckets"] = trained
        if precision == "bf16-mixed":
            layer_share = shape.layer_matmul_params / shape.layers if cfg.gradient_checkpointing else 0
            kept = shape.linear_params - (shape.layer_matmul_params - layer_share if cfg.gradient_checkpointing else 0)
            device["bfloat16 weight copies"] = kept * 2
    (host if cfg.fsdp_offload and not on_cpu else device)["optimizer step"] = step
    device["activations"] = activation_bytes(shape, work, precision, cfg.fsdp, cfg.gradient_checkpointing, eager)
    return device, host


# --------------------------------------------------------------------------------------------
# The target: the processes and devices planned for


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of square matmuls on `device` in `dtype`, measured."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done * 2 * n**3 / (time.perf_counter() - start)


def available_memory() -> float:
    """Bytes of this machine's memory available to new processes (Linux), else its total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_target(spec: str, precision: str, gpus: int | None, gpu_memory: float | None, nodes: int,
                   gpu_tflops: float | None, host_memory: float | None) -> Target:
    """The processes planned for: `gpus` GPUs of `gpu_memory` GiB over `nodes` machines, or else the processes and
    device this command runs on (WORLD_SIZE and LOCAL_WORLD_SIZE of its launcher, `--device`)."""
    from .models import rank_device, resolve_device

    if gpus is not None or gpu_memory is not None:
        if gpus is None or gpu_memory is None:
            raise Llama2VecError("--plan-gpus and --plan-gpu-memory go together: the GPUs of the job, and the GiB "
                                 "of each")
        if gpus < 1 or nodes < 1 or gpus % nodes:
            raise Llama2VecError(f"--plan-gpus {gpus} over --plan-nodes {nodes}: give a whole number of GPUs a node")
        if gpu_memory <= 0 or (gpu_tflops is not None and gpu_tflops <= 0):
            raise Llama2VecError("--plan-gpu-memory and --plan-gpu-tflops must be positive")
        per_node = gpus // nodes
        rate = gpu_tflops * 1e12 if gpu_tflops else None
        target = Target("cuda", gpus, per_node, gpu_memory * GIB, host_memory * GIB if host_memory else None, rate,
                        f"{gpu_tflops:g} TFLOP/s a GPU (--plan-gpu-tflops)" if rate else
                        "unknown: give --plan-gpu-tflops (a GPU's dense bfloat16 TFLOP/s)", CUDA_RUNTIME, False)
        for rank in range(gpus):
            node, local = divmod(rank, per_node)
            device = rank_device("auto" if spec in ("auto", "cpu") else spec, local, per_node, per_node)
            target.ranks.append((rank, node, local, str(device)))
        return target
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(spec)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    rate = matmul_rate(device, dtype)
    if device.type == "cuda":
        memory, runtime = torch.cuda.get_device_properties(device).total_memory, CUDA_RUNTIME
        note = f"{rate / 1e12:.1f} TFLOP/s, measured on {torch.cuda.get_device_name(device)}"
    else:
        memory, runtime = available_memory(), 0.0  # measured once the model's code is loaded (see dry_run)
        rate /= per_node  # the processes of a machine share its cores
        note = f"{rate / 1e9:.0f} GFLOP/s a process, measured here ({per_node} process(es) sharing the cores)"
    target = Target(device.type, world, per_node, memory, available_memory() if device.type == "cuda" else None,
                    rate, note, runtime, True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for rank in range(world):
        node, local = divmod(rank, per_node)
        shown = rank_device(spec, local if world > 1 else None, per_node, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        target.ranks.append((rank, node, local, str(shown)))
    return target


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    target: Target
    cfg: TrainConfig
    precision: str
    shape: Shape
    work: Work
    device: dict[str, float]
    host: dict[str, float]
    examples: int | None
    examples_note: str
    example_tokens: int

    def phase(self, part: str) -> str:
        """When a part is held: throughout ('held'), in the forward and backward passes ('backward'), or from the
        backward pass to the optimizer step ('step'; held throughout under gradient accumulation)."""
        if part in ("activations", "bfloat16 weight copies", "gathered units"):
            return "backward"
        if part == "optimizer step" or (part.startswith("gradients") and self.cfg.grad_accum == 1):
            return "step"
        return "held"

    @property
    def per_process(self) -> float:
        """The peak: what is held throughout, plus the larger of the passes' and the optimizer step's parts
        (activations are freed as the backward pass makes the gradients)."""
        sums = {"held": 0.0, "backward": 0.0, "step": 0.0}
        for part, value in self.device.items():
            sums[self.phase(part)] += value
        return sums["held"] + max(sums["backward"], sums["step"])

    @property
    def limit(self) -> float:
        """Bytes one process may use: 90% of a GPU, or its share of 90% of a CPU machine's available memory."""
        share = self.target.memory * USABLE
        return share / self.target.per_node if self.target.device == "cpu" else share

    @property
    def fits(self) -> bool:
        host_ok = True
        if self.target.host is not None and self.target.device == "cuda":
            host_ok = self.host_per_node <= self.target.host * USABLE
        return self.per_process <= self.limit and host_ok

    @property
    def host_per_node(self) -> float:
        whole = self.host.get(WHOLE, 0.0)
        return (sum(self.host.values()) - whole) * self.target.per_node + whole

    @property
    def steps(self) -> int | None:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        if self.examples is None:
            return None
        batches = math.ceil(math.ceil(self.examples / self.target.world) / self.cfg.batch_size)  # a process's
        return max(1, math.ceil(self.cfg.epochs * max(1, math.ceil(batches / self.cfg.grad_accum))))

    @property
    def tokens(self) -> int | None:
        steps = self.steps
        return None if steps is None else steps * self.global_batch * self.example_tokens

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.target.world

    def flops_per_token(self) -> float:
        s = self.shape
        trained = s.layer_matmul_params - s.frozen_matmul_params
        per_weight = 6 * trained + 4 * s.frozen_matmul_params
        length = max(length for _, length in self.work.passes)
        attention = 12 * s.layers * length * s.head_width / 2  # causal: half the products
        if self.cfg.gradient_checkpointing:
            per_weight += 2 * s.layer_matmul_params
            attention *= 4 / 3
        return per_weight + attention

    @property
    def seconds(self) -> float | None:
        tokens = self.tokens
        if tokens is None or not self.target.rate:
            return None
        return tokens * self.flops_per_token() / (self.target.world * self.target.rate * UTILISATION)


def flags(changes: dict) -> str:
    names = {"gradient_checkpointing": "--gradient-checkpointing", "fsdp": "--fsdp", "fsdp_offload": "--fsdp-offload"}
    out = [names[k] for k in names if changes.get(k)]
    if "batch_size" in changes:
        out.append(f"--batch-size {changes['batch_size']} --grad-accum {changes['grad_accum']}")
    return " ".join(out)


def alternative(plan: Plan, build) -> tuple[str, Plan] | None:
    """The first change, cheapest first, that makes a plan that does not fit fit (each keeps the global batch):
    gradient checkpointing, then FSDP, then its CPU offload, then halving the micro-batch."""
    cfg, changes = plan.cfg, {}
    ladder = [] if cfg.gradient_checkpointing else [{"gradient_checkpointing": True}]
    if not cfg.lora:
        ladder += [] if cfg.fsdp or plan.target.world == 1 else [{"fsdp": True}]
        ladder += [] if cfg.fsdp_offload else [{"fsdp": True, "fsdp_offload": True}]
    batch, accum = cfg.batch_size, cfg.grad_accum
    while batch > 1 and batch % 2 == 0:
        batch, accum = batch // 2, accum * 2
        ladder.append({"batch_size": batch, "grad_accum": accum})
    for step in ladder:
        changes.update(step)
        candidate = build(dataclasses.replace(cfg, **changes))
        if candidate.fits:
            shown = flags(changes)
            if "batch_size" in changes and plan.work.logit_positions == 0:  # contrastive: the loss changes
                shown += " (each micro-batch then holds fewer in-batch negatives)"
            return shown, candidate
    return None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def describe(plan: Plan, command: str) -> str:
    t, cfg, s = plan.target, plan.cfg, plan.shape
    lines = [f"llama2vec {command} --dry-run: nothing trained, nothing written"]
    where = "the processes of this launch" if t.here else f"{t.world} GPU(s) over {t.world // t.per_node} node(s)"
    lines.append(f"processes: {t.world} ({where}; {t.per_node} a node); precision {plan.precision}")
    shown = t.ranks if len(t.ranks) <= 8 else t.ranks[: t.per_node]
    lines.append("devices: " + ", ".join(f"rank {r} -> node {n} {d}" for r, n, _, d in shown)
                 + (" (the same on every node)" if len(shown) < len(t.ranks) else ""))
    lines.append(f"model: {s.params / 1e9:.3g}B parameters ({s.layers} decoder layers, hidden {s.hidden}, vocabulary "
                 f"{s.vocab}), {s.trainable / 1e6:.1f}M trained" + (" (LoRA)" if cfg.lora else ""))
    if cfg.fsdp:
        lines.append(f"sharding: FSDP2 over {t.world} process(es): {s.layers - 1} decoder layers one unit each, the "
                     f"root unit (embeddings, last layer, norm, LM head: {s.root_params / 1e6:.0f}M) besides; each "
                     f"process holds 1/{t.world} of every unit" + (", in CPU memory" if cfg.fsdp_offload else ""))
    else:
        lines.append("sharding: none: a whole copy a process" + (", gradients averaged by DDP" if t.world > 1 else ""))
    rows = ", ".join(f"{r} x {n} tokens" for r, n in plan.work.passes)
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    lines.append(f"micro-batch: {rows} a process; gradient checkpointing {checkpointing}")
    lines.append(f"memory a process ({t.device}):")
    when = {"held": "held throughout", "backward": "forward and backward", "step": "backward to optimizer step"}
    lines += [f"  {name:<36} {_gib(v):>10}  {when[plan.phase(name)]}" for name, v in plan.device.items()]
    lines.append(f"  {'peak (held + the larger phase)':<36} {_gib(plan.per_process):>10}  of {_gib(plan.limit)} usable "
                 + (f"(90% of {_gib(t.memory)} a GPU)" if t.device == "cuda" else
                    f"(90% of {_gib(t.memory)} available here, shared by {t.per_node} process(es))"))
    if t.device == "cuda" and plan.host:
        lines.append(f"CPU memory a node: {_gib(plan.host_per_node)} at most"
                     + (f" of {_gib(t.host)}" if t.host else "")
                     + (" (the main process reads the whole model before sending the shards)" if cfg.fsdp else ""))
    steps, tokens, seconds = plan.steps, plan.tokens, plan.seconds
    if steps is None:
        lines.append(f"steps: unknown ({plan.examples_note}): give --max-steps")
    else:
        lines.append(f"steps: {steps:,} of {plan.global_batch} examples each ({plan.examples_note}); tokens: at most "
                     f"{tokens:,} ({plan.example_tokens} an example)")
    if seconds is not None:
        lines.append(f"time: about {_duration(seconds)} ({plan.flops_per_token() / 1e9:.2f} GFLOP a token at "
                     f"{UTILISATION:.0%} of {t.rate_note})")
    else:
        lines.append(f"time: not estimated (rate {t.rate_note})" if not t.rate else "time: not estimated")
    lines.append("fits" if plan.fits else "does not fit")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def verdict(plan: Plan, build) -> None:
    """Raise, naming what does not fit and what would, when the plan does not fit."""
    if plan.fits:
        return
    t = plan.target
    if plan.per_process > plan.limit:
        what = (f"each process needs {_gib(plan.per_process)}, over the {_gib(plan.limit)} usable of "
                + (f"a {_gib(t.memory)} GPU" if t.device == "cuda" else
                   f"this machine's memory shared by {t.per_node} process(es)"))
    else:
        what = f"a node needs {_gib(plan.host_per_node)} of CPU memory, over 90% of its {_gib(t.host or 0)}"
    fix = alternative(plan, build)
    hint = (f"; it fits with {fix[0]} ({_gib(fix[1].per_process)} a process)" if fix
            else "; no change of checkpointing, sharding or micro-batch makes it fit: more or larger devices")
    raise Llama2VecError(f"the plan does not fit: {what}{hint}")


# --------------------------------------------------------------------------------------------
# The two commands


def _tokenizer_or_none(path: str):
    from .models import load_tokenizer

    try:
        return load_tokenizer(path)
    except Llama2VecError:
        return None


def _prompt_lengths(spec, tokenizer) -> tuple[int, int, int]:
    """(tokens before the text, SELF suffix, NEXT suffix) of the prompt, placeholders included."""
    from .models import add_placeholder_tokens
    from .prompts import prompt_ids

    if tokenizer is None:  # estimated: 4 characters a token
        return (1 + math.ceil(len(spec.prefix) / 4), math.ceil(len(spec.self_suffix) / 4) + spec.k,
                math.ceil(len(spec.next_suffix) / 4) + spec.k)
    add_placeholder_tokens(tokenizer, None, spec.new_tokens())
    ids = prompt_ids(spec, tokenizer)
    return len(ids.bos) + len(ids.prefix), len(ids.self_suffix), len(ids.next_suffix)


def estimate_pairs(corpus: Path, tokenizer, data_cfg: DataConfig) -> tuple[int | None, str]:
    """(pairs, how they were counted) of an adaptation corpus: from a pair cache; exactly for a JSONL corpus
    of at most SAMPLE_DOCUMENTS documents, else scaled from its first SAMPLE_DOCUMENTS by bytes."""
    from .data import PairDataset, chunk_stream, read_documents

    if data_cfg.pairs:
        return len(PairDataset(data_cfg.pairs)), f"the pairs of {data_cfg.pairs}"
    if not corpus.is_file():
        return None, f"{corpus} not found here"
    if tokenizer is None:
        return None, "no tokenizer to chunk the corpus with"
    limit = min(SAMPLE_DOCUMENTS, data_cfg.max_documents or SAMPLE_DOCUMENTS)
    texts = [f"{d.title}\n{d.text}" if d.title else d.text for d in read_documents(corpus, None, limit)]
    chunk_tokens = data_cfg.chunk_tokens or data_cfg.max_length
    pairs = sum(max(0, len(c) - 1) for c in chunk_stream(texts, tokenizer, chunk_tokens, data_cfg.min_chunk_tokens))
    with corpus.open("rb") as fh:
        sample_bytes = sum(len(fh.readline()) for _ in range(len(texts)))
        whole = fh.readline() == b""
    if whole or corpus.suffix != ".jsonl":
        return pairs, f"the pairs of {corpus}" if whole else f"the pairs of the first {len(texts)} documents"
    scale = corpus.stat().st_size / max(1, sample_bytes)
    if data_cfg.max_documents:
        scale = min(scale, data_cfg.max_documents / len(texts))
    return int(pairs * scale), f"estimated from the first {len(texts)} documents of {corpus}"


def dry_run(command: str, model_cfg: ModelConfig, train_cfg: TrainConfig, target_args: dict, prompt_cfg,
            pretext_cfg: PretextConfig | None = None, data_cfg: DataConfig | None = None, con_cfg=None) -> Plan:
    """Plan `command` (adapt or finetune) with these configs, print the plan, and raise when it does not fit."""
    from .models import resolve_dtype, resolve_model_path
    from .prompts import CONFIG_NAME, PromptSpec, resolve_prompt
    from .train import resolve_precision

    path = resolve_model_path(model_cfg.model)
    gpus = target_args.get("gpus") is not None or target_args.get("gpu_memory") is not None
    model_cfg, precision = resolve_precision(model_cfg, train_cfg, "cuda" if gpus else None)
    target = resolve_target(model_cfg.device, precision, **target_args)
    tokenizer = _tokenizer_or_none(path)
    if command == "adapt":
        spec = resolve_prompt(prompt_cfg, data_cfg.max_length)
    elif (Path(path) / CONFIG_NAME).is_file():
        spec = PromptSpec.load(path)
    else:
        spec = resolve_prompt(prompt_cfg)
    head, self_len, next_len = _prompt_lengths(spec, tokenizer)
    if command == "adapt":
        text = head + data_cfg.max_length
        lengths = [text + self_len + next_len] if pretext_cfg.joint else [text + self_len, text + next_len]

        def work_of(b: int) -> Work:
            return Work([(b, n) for n in lengths], 2 * spec.k * b, b * text if pretext_cfg.lm_weight > 0 else 0)

        examples, note = estimate_pairs(Path(data_cfg.corpus or ""), tokenizer, data_cfg)
        example_tokens = sum(lengths)
    else:
        q = head + con_cfg.query_max_length + (next_len if spec.query_task == "next" else self_len)
        p = head + con_cfg.passage_max_length + self_len

        def work_of(b: int) -> Work:
            return Work([(b, q), (b * con_cfg.group_size, p)], 0)

        examples, note = _count_lines(con_cfg.train, con_cfg.max_examples)
        example_tokens = q + con_cfg.group_size * p
    dtype = resolve_dtype(model_cfg.dtype, torch.device(target.device))
    eager = model_cfg.attn_implementation == "eager"
    shapes: dict[bool, Shape] = {}

    def shape_of(cfg: TrainConfig) -> Shape:
        if cfg.lora not in shapes:
            tok = _tokenizer_or_none(path) if tokenizer is not None else None
            shapes[cfg.lora] = model_shape(model_cfg, path, dtype, spec.new_tokens(), tok, cfg.lora, cfg.lora_r,
                                           frozen_head=command == "finetune")
        return shapes[cfg.lora]

    def build(cfg: TrainConfig) -> Plan:
        shape, work = shape_of(cfg), work_of(cfg.batch_size)
        device, host = rank_memory(shape, work, cfg, precision, target.world, eager, target.runtime, target.device)
        return Plan(target, cfg, precision, shape, work, device, host, examples, note, example_tokens)

    shape_of(train_cfg)
    if target.device == "cpu":  # what a training process holds before its weights: the code, the model's classes
        from torch.distributed import fsdp  # noqa: F401

        from .train import make_accelerator, rss_mib  # noqa: F401  (accelerate's modules, as training has them)

        target.runtime = rss_mib() * 2**20
    plan = build(train_cfg)
    if os.environ.get("RANK", "0") == "0":
        print(describe(plan, command), flush=True)
    verdict(plan, build)
    return plan


def _count_lines(path: str | None, limit: int | None) -> tuple[int | None, str]:
    if not path or not Path(path).is_file():
        return None, f"{path} not found here"
    with open(path, "rb") as fh:
        n = sum(1 for line in fh if line.strip())
    return (min(n, limit) if limit else n), f"the examples of {path}"


def plan_summary(plan: Plan) -> dict:
    """The plan as JSON-ready numbers (MiB), for tests and scripts."""
    return {"device": {k: v / 2**20 for k, v in plan.device.items()}, "per_process_mib": plan.per_process / 2**20,
            "host": {k: v / 2**20 for k, v in plan.host.items()}, "fits": plan.fits, "steps": plan.steps,
            "tokens": plan.tokens, "seconds": plan.seconds}

