"""Run under torch.distributed.run with 2 CPU processes: the InfoNCE loss and gradients with
cross-process negatives, against one process on the same global batch. Writes JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from conftest import make_model  # noqa: E402

from llama2vec.collate import left_pad  # noqa: E402
from llama2vec.finetune import ContrastiveModel  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = make_model(64).train()
G, B = 3, 2  # group size, queries per process
gen = torch.Generator().manual_seed(1)


def rows(count: int, longest: int) -> list[list[int]]:
    lengths = torch.randint(3, longest, (count,), generator=gen)
    return [torch.randint(4, 64, (int(n),), generator=gen).tolist() for n in lengths]


queries, passages = rows(B * world, 9), rows(B * world * G, 12)


def batch(qs, ps):
    q, p = left_pad(qs, 0), left_pad(ps, 0)
    out = {f"q_{k}": v for k, v in zip(("input_ids", "attention_mask", "position_ids"), q)}
    out.update({f"p_{k}": v for k, v in zip(("input_ids", "attention_mask", "position_ids"), p)})
    return out


module = ContrastiveModel(model, k=1, pooling="last", temperature=0.05, group_size=G, cross_device=True)
local = batch(queries[rank * B:(rank + 1) * B], passages[rank * B * G:(rank + 1) * B * G])
loss = module(**local)["loss"]
loss.backward()
grads = []
for p in model.parameters():  # what DDP does: average the gradients over processes
    g = p.grad.clone()
    dist.all_reduce(g)
    grads.append(g / world)
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)
mean_loss /= world

if rank == 0:
    model.zero_grad()
    single = ContrastiveModel(model, k=1, pooling="last", temperature=0.05, group_size=G, cross_device=False)
    ref = single(**batch(queries, passages))["loss"]
    ref.backward()
    diff = max((g - p.grad).abs().max().item() for g, p in zip(grads, model.parameters()))
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    json.dump({"distributed": mean_loss.item(), "single": ref.item(), "grad_diff": diff, "grad_scale": scale},
              open(sys.argv[1], "w"))
dist.destroy_process_group()
