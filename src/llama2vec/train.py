"""The training loop shared by adaptation and fine-tuning, on top of accelerate.

The same code runs on one CPU, one GPU, or under `torchrun` / `accelerate launch` with one process a
device: DDP, or with --fsdp torch's FSDP2 (`fully_shard`). It shows a progress bar, logs every loss part to
TensorBoard and to `log.jsonl`, writes checkpoints atomically (a temporary folder renamed when
complete) and resumes from the last complete one with the same data order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .config import ModelConfig, TrainConfig
from .errors import Llama2VecError
from .store import TMP_TAG, temp_path, write_json, write_lines

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
# What a run writes before its first checkpoint: a folder holding only these is restarted, not refused.
RANKS = "ranks"  # one report a process: its device, where its weights live, its peak memory
RUN_FILES = {"run_config.yaml", "data", "logs", LOG_FILE, CHECKPOINTS, RANKS}


# --------------------------------------------------------------------------------------------
# Output folder


def is_main_rank() -> bool:
    """True on the one process that owns the output folder (RANK is set by torchrun/accelerate)."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output(cfg: TrainConfig) -> Path:
    """Create the output folder, refusing to reuse a non-empty one without --overwrite/--resume.
    Only the main process checks and creates it; the others wait for it at their first barrier."""
    if not cfg.output:
        raise Llama2VecError("--output is required")
    out = Path(cfg.output)
    if not is_main_rank():
        return out
    if out.exists() and not out.is_dir():
        raise Llama2VecError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume and stopped_before_first_checkpoint(out):
            log.info("%s: holds a run that stopped before its first checkpoint: starting it again", out)
            shutil.rmtree(out)
        elif not cfg.resume:
            raise Llama2VecError(f"{out}: output folder exists and is not empty: pass --overwrite to replace "
                                 f"it or --resume to continue its run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_path(out / "write-test")  # removed by the next writer if a kill leaves it
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise Llama2VecError(f"{out}: output folder is not writable: {e.strerror or e}") from None
    return out


def stopped_before_first_checkpoint(out: Path) -> bool:
    """True when `out` holds only what a run writes before its first checkpoint (its config, data
    cache, logs, temporaries): nothing that the same command, run again, would lose."""
    names = {p.name for p in out.iterdir() if TMP_TAG not in p.name}
    return names <= RUN_FILES and not complete_checkpoints(out)


# --------------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary name), oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_partial_checkpoints(out: Path) -> None:
    """Delete the checkpoints that a killed or failed save left half-written."""
    for stale in (out / CHECKPOINTS).glob("*"):
        if stale.name.startswith(("tmp-checkpoint-", "deleting-checkpoint-")):
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(accelerator, out: Path, step: int, keep: int, sharded: tuple | None = None) -> None:
    """Every process writes its part into `tmp-checkpoint-STEP` (one name that all processes
    know); the main process then adds state.json and renames it. A save that fails (a full disk)
    removes its partial folder and raises. `sharded`: (FSDP module, optimizer), whose shards every
    process writes (torch.distributed.checkpoint)."""
    folder = out / CHECKPOINTS
    tmp = folder / f"tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)
        if sharded:
            save_sharded(tmp, *sharded)
        accelerator.wait_for_everyone()  # every process has written its part before the rename
        if accelerator.is_main_process:
            write_json(tmp / "state.json", {"step": step})
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder).free / 2**20
        raise Llama2VecError(f"{folder / f'checkpoint-{step}'}: cannot write the checkpoint ({free:.0f} MiB free on "
                             f"that disk; a full disk or a file size limit?): {str(e).strip()}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        final = folder / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
            # Renamed first: a deletion killed half-way must not leave a folder that looks complete.
            doomed = old.with_name(f"deleting-{old.name}")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)  # a kill here leaves it to remove_partial_checkpoints
    accelerator.wait_for_everyone()


def checkpoint_trainable_only(accelerator, module: nn.Module) -> bool:
    """When only some weights train (LoRA: the adapters and the placeholder rows), checkpoints hold
    those and the optimizer state, not the frozen base model, which a resumed run loads from its
    source again. Returns whether checkpoints are partial."""
    params = dict(module.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if len(trainable) == len(params):
        return False

    def keep_trainable(models, weights, output_dir) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k in trainable}

    accelerator.register_save_state_pre_hook(keep_trainable)
    return True


# --------------------------------------------------------------------------------------------
# FSDP2


def init_distributed(device: torch.device, fsdp: bool = False) -> None:
    """Start the process group, once, before anything is loaded: between the processes of a launch (torchrun,
    accelerate launch), or of this process alone for --fsdp in one process (to offload to CPU memory). gloo
    between CPU processes; on GPUs NCCL, with gloo beside it for the tensors kept in CPU memory
    (--fsdp-offload's gradients, whose global norm the clipping reduces)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "WORLD_SIZE" in os.environ and (int(os.environ["WORLD_SIZE"]) > 1 or fsdp):
        dist.init_process_group(backend, **kwargs)
    elif fsdp:
        global _OWN_GROUP
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        _OWN_GROUP = True


_OWN_GROUP = False  # a group of this process alone, started for --fsdp: closed when its run ends


def close_own_group() -> None:
    global _OWN_GROUP
    if _OWN_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():  # accelerate's end_training may have closed it
            dist.destroy_process_group()
        _OWN_GROUP = False


def shard(module: nn.Module, device: torch.device, bf16: bool, offload: bool = False,
          full_state: dict | None = None) -> None:
    """Shard `module` (a training module holding the LM as `.model`) over the processes with torch's
    FSDP2: each decoder layer but the last is one unit, whose weights are gathered just before it
    runs; the rest belongs to the root. With `bf16`, compute in bfloat16 and reduce gradients in float32; the
    sharded weights and optimizer states stay in their dtype (float32 under bf16-mixed). With `offload`, the
    shards live in CPU memory (torch's CPUOffloadPolicy).

    Processes that built `module` on the meta device (see `load_training_lm`) receive their shards from the
    main process, which passes its whole weights as `full_state`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from .losses import unwrap_lm

    if not (dist.is_available() and dist.is_initialized()):
        raise Llama2VecError("--fsdp shards over several processes: run under torchrun or accelerate launch")
    decoder = unwrap_lm(module.model).get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise Llama2VecError(f"--fsdp: no decoder layer list found in {type(decoder).__name__}")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    placement = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    # The last layer stays with the root's unit: encoding runs its parts at the pooled positions
    # alone (losses.last_states), outside its forward, where a unit of its own would not be gathered.
    for layer in layers[:-1]:
        fully_shard(layer, mp_policy=policy, offload_policy=placement)
    fully_shard(module, mp_policy=policy, offload_policy=placement)
    empty = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if empty or full_state is not None:  # the main process sends every other one its shards
        if empty:
            module.to_empty(device="cpu" if offload else device)
        for sub in module.modules():  # buffers are not sharded: each process keeps them on its device
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    sub._buffers[name] = buffer.to(device)
        set_model_state_dict(module, full_state if full_state is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in module.buffers():  # buffers outside the state dict (rotary frequencies) too
            dist.broadcast(buffer, src=0)
    log.info("FSDP: weights sharded over %d processes%s", dist.get_world_size(),
             ", kept in CPU memory" if offload else "")


def save_sharded(folder: Path, module: nn.Module, optimizer) -> None:
    """Each process writes its shards of the weights and optimizer states into `folder/fsdp`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, states = get_state_dict(module, optimizer)
    dcp.save({"model": weights, "optim": states}, checkpoint_id=str(folder / "fsdp"))


def load_sharded(folder: Path, module: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, states = get_state_dict(module, optimizer)
    state = {"model": weights, "optim": states}
    dcp.load(state, checkpoint_id=str(folder / "fsdp"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_weights(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded LM, gathered on the CPU of the main process (every process
    takes part; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return untied(lm, get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def untied(lm: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with a tied LM head saved once, as the input embeddings, like an unsharded save."""
    head = lm.get_output_embeddings()
    if weights and head is not None and head.weight is lm.get_input_embeddings().weight:
        weights.pop(next(n for n, m in lm.named_modules() if m is head) + ".weight", None)
    return weights


# --------------------------------------------------------------------------------------------
# Data order


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation per epoch: the data order depends only on (seed, epoch).

    With `lengths`, examples of similar length share batches (less padding): the permutation is
    cut into mega-batches of `group` batches, each sorted by length and cut into batches, and the
    batches are shuffled, so the order stays random but every batch is nearly uniform in length.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, lengths=None, batch_size: int = 1,
                 group: int = 50):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.lengths, self.batch_size, self.group = lengths, batch_size, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return iter(order)
        size = self.batch_size * self.group
        batches = []
        for start in range(0, self.n, size):
            mega = sorted(order[start: start + size], key=lambda i: -int(self.lengths[i]))
            batches += [mega[i: i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]  # at most one short batch per mega-batch
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return iter([i for b in shuffled + rest for i in b])


def padding_fraction(lengths, order: list[int], batch_size: int, fixed: int = 0) -> float:
    """Padded share of the token slots when `order` is cut into batches of `batch_size`; every
    row also carries `fixed` unpadded tokens (the prompt)."""
    pad = slots = 0
    for start in range(0, len(order), batch_size):
        batch = [int(lengths[i]) for i in order[start: start + batch_size]]
        pad += max(batch) * len(batch) - sum(batch)
        slots += (max(batch) + fixed) * len(batch)
    return pad / max(slots, 1)


# --------------------------------------------------------------------------------------------
# The loop


def resolve_precision(model_cfg: ModelConfig, cfg: TrainConfig, device_type: str | None = None
                      ) -> tuple[ModelConfig, str]:
    """(the model config to load for training, the precision): fp32 and bf16-mixed load float32
    weights (bf16-mixed computes in bfloat16 under autocast, its optimizer updates float32 master
    weights), bf16 loads bfloat16 weights. auto: bf16-mixed on CUDA, fp32 on CPU (the device of `--device`
    here, or `device_type`)."""
    from .models import resolve_device

    precision = cfg.precision
    if precision == "auto":
        device_type = device_type or resolve_device(model_cfg.device).type
        precision = "bf16-mixed" if device_type == "cuda" else "fp32"
    dtype = "bfloat16" if precision == "bf16" else "float32"
    if model_cfg.dtype not in ("auto", dtype):
        raise Llama2VecError(f"--dtype {model_cfg.dtype} does not go with --precision {precision} (weights in "
                             f"{dtype}): in training, --precision sets the weights' dtype")
    return dataclasses.replace(model_cfg, dtype=dtype), precision


def make_accelerator(cfg: TrainConfig, device: torch.device, out: Path, precision: str = "fp32"):
    """The accelerator of this process, on `device` (from `models.resolve_device`), after the process group
    (see `init_distributed`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    init_distributed(device, cfg.fsdp)
    # Runs in one process (the demo, a notebook) may differ in precision: accelerate keeps one state
    # per process, so the last run's is dropped (the process group, in PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if precision == "bf16-mixed" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if process_device(accelerator) != device:
        raise Llama2VecError(f"this process trains on {device}, but accelerate placed it on {accelerator.device} "
                             f"(LOCAL_RANK={os.environ.get('LOCAL_RANK')}): launch one process a GPU")
    return accelerator


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: VmHWM on Linux, which starts afresh at exec (getrusage's
    ru_maxrss would carry the resident memory of the process that started this one)."""
    import resource

    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux; elsewhere its peak so far)."""
    now = _status_mib("VmRSS")
    return now if now is not None else peak_rss_mib()


_RSS_BEFORE_WEIGHTS: list[float] = [0.0]  # set by load_training_lm, read by the rank report


def write_rank_report(accelerator, module: nn.Module, out: Path, loaded_mib: float) -> dict:
    """`out/ranks/rank-R.json`: this process's rank, device, the devices its weights live on and how many
    bytes of them it holds, and its resident memory just before the weights were read (`start`, the code that
    runs them loaded), its peak after they were placed or sharded (`loaded`) and at the end of training (`end`); on
    a GPU also the CUDA allocator's peak (`peak_gpu_mib`)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    report = {"rank": int(os.environ.get("RANK", "0")), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
              "world_size": accelerator.num_processes, "device": str(process_device(accelerator)),
              "weights_on": sorted({str(t.device) for t in local}),
              "weights_mib": round(sum(t.numel() * t.element_size() for t in local) / 2**20, 1),
              "peak_rss_mib": {"start": round(_RSS_BEFORE_WEIGHTS[0], 1), "loaded": round(loaded_mib, 1),
                               "end": round(peak_rss_mib(), 1)}}
    device = process_device(accelerator)
    if device.type == "cuda":  # the caching allocator's peak, and the device's use at the end (CUDA context included)
        free, total = torch.cuda.mem_get_info(device)
        report["peak_gpu_mib"] = {"reserved": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
                                  "used_at_end": round((total - free) / 2**20, 1)}
    write_json(out / RANKS / f"rank-{report['rank']}.json", report)
    log.info("rank %d: %s, weights on %s (%.1f MiB), peak memory %s MiB", report["rank"], report["device"],
             ", ".join(report["weights_on"]), report["weights_mib"], report["peak_rss_mib"])
    return report


def process_device(accelerator) -> torch.device:
    """The accelerator's device, as `models.resolve_device` names it: a GPU with its index (a bare `cuda` is the
    current GPU), the CPU without one (accelerate's processes on CPUs say `cpu:0`)."""
    device = accelerator.device
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "cpu" else device


def load_training_lm(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, path: str | None = None):
    """(tokenizer, LM) to train, read straight onto this process's device. Under --fsdp the main process reads
    it into CPU memory and the others build it on the meta device (no storage): `shard` then sends each process
    its shards, so that the processes of a machine hold one whole copy between them, not one each."""
    from .models import load_causal_lm, load_empty_lm, load_tokenizer, resolve_dtype, resolve_model_path, setup_cpu

    if device.type == "cpu":
        setup_cpu()
    path = path or resolve_model_path(model_cfg.model)
    tokenizer = load_tokenizer(path)
    empty = load_empty_lm(model_cfg, path, resolve_dtype(model_cfg.dtype, device))  # no storage
    if cfg.fsdp:
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401
    _RSS_BEFORE_WEIGHTS[0] = rss_mib()
    if not cfg.fsdp:
        return tokenizer, load_causal_lm(model_cfg, path, device, tokenizer)[1]
    if is_main_rank():
        return tokenizer, load_causal_lm(model_cfg, path, torch.device("cpu"), tokenizer)[1]
    return tokenizer, empty


def run_training(accelerator, module: nn.Module, dataset, collator: Callable, cfg: TrainConfig, out: Path,
                 run_name: str, hparams: dict | None = None, shuffle: bool = True, lengths=None) -> dict:
    """Train `module` (forward(**batch) -> {'loss': ..., other named parts}) on `dataset`; with
    `lengths` (one per example), batches group examples of similar length.

    Returns a summary: steps run, resumed-from step, seconds, last logged losses.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    set_seed(cfg.seed)
    sampler = EpochSampler(len(dataset), cfg.seed, shuffle, lengths, cfg.batch_size)
    # A generator of its own: each new iterator (an epoch, a resumed run) draws its base seed from it, not from
    # torch's global generator, whose state the checkpoint restores for dropout (a resumed run draws the same masks).
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.fsdp:
        full_state = module.state_dict() if is_main_rank() else None  # the whole weights, read by this process
        shard(module, process_device(accelerator), accelerator.mixed_precision == "bf16", cfg.fsdp_offload,
              full_state)
        del full_state
        loaded_mib = peak_rss_mib()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise Llama2VecError("no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.fsdp:  # FSDP syncs its own gradients: the module and optimizer stay out of accelerate's wrappers
        loader = accelerator.prepare(loader)
        partial, sharded = False, (module, optimizer)
    else:
        module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
        partial, sharded = checkpoint_trainable_only(accelerator, module), None
        loaded_mib = peak_rss_mib()
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what the optimizer steps
    max_norm = cfg.max_grad_norm or math.inf  # inf: the norm is measured and logged, the gradients kept
    # An optimizer step takes grad_accum micro-batches; the last of an epoch may take fewer (accelerate
    # syncs at the end of the data loader).
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total), total)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    checkpoints = complete_checkpoints(out) if cfg.resume else []
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]), strict=not partial)
        if sharded:
            load_sharded(checkpoints[-1], *sharded)
        step = json.loads((checkpoints[-1] / "state.json").read_text())["step"]
        log.info("resuming from %s (step %d of %d)", checkpoints[-1], step, total)
    resumed_from = step
    log_path = out / LOG_FILE
    if accelerator.is_main_process:
        remove_partial_checkpoints(out)
        _truncate_log(log_path, step)
    accelerator.init_trackers(run_name, config={k: v for k, v in (hparams or {}).items()
                                                if isinstance(v, (int, float, str, bool))})

    module.train()
    bar = tqdm(total=total, initial=step, desc=run_name, unit="step", disable=not accelerator.is_main_process)
    sums: dict[str, float] = {}
    micro, tokens, t0, t_log, norms = 0, 0, time.time(), time.time(), []
    last: dict[str, float] = {}
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum) if done_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(module):
                parts = module(**batch)
                accelerator.backward(parts["loss"])
                if accelerator.sync_gradients:  # the last micro-batch of an optimizer step
                    norm = accelerator.clip_grad_norm_(params, max_norm)  # over every process's gradients
                    norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
                    optimizer.step()
                    scheduler.step()  # the schedule counts optimizer steps, not micro-batches
                    optimizer.zero_grad()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            micro += 1
            tokens += int(batch["n_tokens"]) if "n_tokens" in batch else 0
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total:
                names = sorted(sums)
                means = torch.tensor([sums[k] / micro for k in names], device=accelerator.device)
                last = dict(zip(names, accelerator.reduce(means, reduction="mean").tolist()))  # over processes
                elapsed = time.time() - t_log
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          "lr": scheduler.get_last_lr()[0], **last, "grad_norm": sum(norms) / len(norms),
                          "tokens_per_s": tokens * accelerator.num_processes / elapsed if elapsed > 0 else 0.0}
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                if accelerator.is_main_process:
                    with log_path.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                        fh.flush()
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
                sums, micro, tokens, t_log, norms = {}, 0, 0, time.time(), []
            if (cfg.save_steps > 0 and step % cfg.save_steps == 0) or step == total:
                save_checkpoint(accelerator, out, step, cfg.save_total_limit, sharded)
            if step >= total:
                break
    bar.close()
    report = write_rank_report(accelerator, module, out, loaded_mib)
    for tracker in accelerator.trackers:  # the process group stays up for the caller's final save
        tracker.finish()
    return {"steps": step, "resumed_from": resumed_from, "seconds": time.time() - t0, "last": last,
            "module": accelerator.unwrap_model(module), "rank": report,
            "sharded": sharded is not None}


def _log_records(path: Path) -> list[dict]:
    """The records of a log.jsonl; a line cut short by a killed run (the last one) is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # written when the process was killed
                log.warning("%s:%d: an incomplete last record (a killed run) is dropped", path, number)
                continue
            raise Llama2VecError(f"{path}:{number}: not a JSON log record") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise Llama2VecError(f"{path}:{number}: a log record needs an integer 'step'")
        records.append(record)
    return records


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past the step a resumed run restarts from, and any cut-short line."""
    if path.is_file():
        write_lines(path, (json.dumps(r) for r in _log_records(path) if r["step"] <= step))


def read_log(out: str | Path) -> list[dict]:
    return _log_records(Path(out) / LOG_FILE)


def finish(accelerator, result: dict, tokenizer, spec, out: Path, gradient_checkpointing: bool) -> dict:
    """Save the trained model folder on the main process (LoRA merged) and close the run.
    Adds the saved model to `result` as 'model' on the main process."""
    from .losses import unwrap_lm
    from .models import save_model_folder

    trained = result.pop("module").model
    weights = full_weights(trained) if result.pop("sharded") else None  # gathered from every process
    if accelerator.is_main_process:
        if gradient_checkpointing:
            unwrap_lm(trained).activation_checkpointing_disable()
        saved = save_model_folder(trained, tokenizer, spec, out, weights)
        if weights is not None:  # the sharded module is no model to use: the saved folder is
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(out)
        result["model"] = saved.eval()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    close_own_group()
    result["output"] = str(out)
    return result
