"""Run under torchrun with 2 processes: one Muon step on an FSDP2-sharded matrix, compared with
the same step on the full matrix in one process and with orthogonalising each shard on its own."""

import json

import torch
import torch.distributed as dist

from prx.distributed import DistInfo, init_distributed
from prx.optim import build_optimizer

info: DistInfo = init_distributed(torch.device("cpu"), 1.0)
torch.manual_seed(0)
m, n = 128, 64
weight0 = torch.randn(m, n) * 0.1
grad = torch.randn(m, n)
group = {"optimizer": "muon", "lr": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "rms_scale": True}


def step_full(w0, g):
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    build_optimizer([{**group, "params": [p]}]).step()
    return p.detach()


full = step_full(weight0, grad)
per_shard = torch.cat([step_full(w, g) for w, g in zip(weight0.chunk(2), grad.chunk(2))])

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

model = torch.nn.Linear(n, m, bias=False)
with torch.no_grad():
    model.weight.copy_(weight0)
fully_shard(model, mesh=init_device_mesh("cpu", (info.world,)))
local = model.weight.to_local()
local.grad = None
model.weight.grad = torch.distributed.tensor.distribute_tensor(grad, model.weight.device_mesh, model.weight.placements)
build_optimizer([{**group, "params": [model.weight]}]).step()
sharded = model.weight.full_tensor().detach()
rel = lambda a, b: float((a - b).norm() / (b - weight0).norm())  # relative to the size of the update
if info.rank == 0:
    print(json.dumps({"vs_full": rel(sharded, full), "vs_per_shard": rel(sharded, per_shard),
                      "full_vs_per_shard": rel(per_shard, full)}))
dist.barrier()  # both ranks done before teardown
dist.destroy_process_group()
