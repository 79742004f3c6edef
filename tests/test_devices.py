"""Which device each process of a launch takes: decided once, from `--device`, the launcher's LOCAL_RANK and
LOCAL_WORLD_SIZE and the GPUs the process sees, before the model is read (simulated here: no GPU is needed)."""

from __future__ import annotations

import pytest
import torch

from llama2vec import models
from llama2vec.errors import Llama2VecError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `n` GPUs; returns the list of devices made current."""
    current: list[torch.device] = []

    def see(n: int, visible: str | None = None) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        return current

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return see


def launched(monkeypatch, rank: int, local_rank: int, world: int, local_world: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world),
                        ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(name, str(value))


def test_eight_processes_on_eight_gpus_take_one_gpu_each(gpus, monkeypatch):
    current = gpus(8)
    for rank in range(8):
        launched(monkeypatch, rank, rank, 8, 8)
        assert models.resolve_device("auto") == torch.device("cuda", rank)
        assert models.resolve_device("cuda") == torch.device("cuda", rank)
    assert current == [torch.device("cuda", r) for r in range(8) for _ in range(2)]  # made current: accelerate's
    # and NCCL's plain `cuda` is then this GPU too


def test_two_nodes_of_four_count_from_the_local_rank(gpus, monkeypatch):
    gpus(4)
    for node in range(2):
        for local in range(4):
            launched(monkeypatch, 4 * node + local, local, 8, 4)
            assert models.resolve_device("auto") == torch.device("cuda", local)


def test_visible_subsets(gpus, monkeypatch):
    gpus(4, "4,5,6,7")  # the indices count within the visible GPUs
    for local in range(4):
        launched(monkeypatch, local, local, 4, 4)
        assert models.resolve_device("auto") == torch.device("cuda", local)
    gpus(1, "3")  # one GPU a process, chosen by the scheduler (SLURM's --gpus-per-task=1)
    launched(monkeypatch, 3, 3, 8, 8)
    assert models.resolve_device("auto") == torch.device("cuda", 0)
    gpus(2, "0,1")
    launched(monkeypatch, 3, 3, 4, 4)
    with pytest.raises(Llama2VecError, match=r"4 processes on this machine but 2 GPUs visible \(CUDA_VISIBLE_DEV"):
        models.resolve_device("auto")


def test_one_process_honours_the_gpu_asked_for(gpus, monkeypatch):
    current = gpus(4)
    assert models.resolve_device("cuda:2") == torch.device("cuda", 2) and current == [torch.device("cuda", 2)]
    assert models.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(Llama2VecError, match="sees 4 GPU"):
        models.resolve_device("cuda:4")
    launched(monkeypatch, 0, 0, 1, 1)  # torchrun with one process is one process
    assert models.resolve_device("cuda:3") == torch.device("cuda", 3)
    launched(monkeypatch, 1, 1, 2, 2)
    with pytest.raises(Llama2VecError, match="takes the GPU of its LOCAL_RANK"):
        models.resolve_device("cuda:1")


def test_cpu_and_no_gpu(gpus, monkeypatch):
    current = gpus(0)
    launched(monkeypatch, 1, 1, 2, 2)
    assert models.resolve_device("auto") == torch.device("cpu") and models.resolve_device("cpu").type == "cpu"
    with pytest.raises(Llama2VecError, match="CUDA is not available"):
        models.resolve_device("cuda")
    gpus(8)
    assert models.resolve_device("cpu") == torch.device("cpu") and current == []


def test_the_model_is_read_onto_the_process_device(gpus, monkeypatch, tiny_model_dir):
    """Every command reads its model through `load_causal_lm`, straight onto the device `resolve_device` gives
    (the weights are not placed on the CPU first and moved, nor left on the current GPU)."""
    from transformers import AutoModelForCausalLM

    from llama2vec.config import ModelConfig

    gpus(8)
    launched(monkeypatch, 5, 5, 8, 8)
    placed = []
    real = AutoModelForCausalLM.from_pretrained

    def load(path, **kwargs):
        placed.append(kwargs.get("device_map"))
        return real(path, **{**kwargs, "device_map": {"": "cpu"}})  # no GPU here: read onto the CPU instead

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    _, _, device = models.load_causal_lm(ModelConfig(model=str(tiny_model_dir), dtype="float32"))
    assert device == torch.device("cuda", 5) and placed == [{"": torch.device("cuda", 5)}]
