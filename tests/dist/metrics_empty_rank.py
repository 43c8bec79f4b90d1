"""Run with torchrun, 2 gloo processes: rank 1 sees no sample at all (more ranks than batches).

Every rank calls compute(); both must get the values of rank 0's data, without hanging."""

import json

import torch
import torch.distributed as dist

from prx.metrics.stats import FrechetMetric, KernelMMDMetric, mean_and_covariance, frechet_distance, rbf_mmd

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
x, y = torch.randn(5, 4, generator=g), torch.randn(4, 4, generator=g) + 1
mmd, fd = KernelMMDMetric(num_features=4), FrechetMetric(num_features=4)
if rank == 0:
    mmd.update(x, real=True, index=torch.arange(5))
    mmd.update(y, real=False, index=torch.arange(4))
    fd.update(x, real=True)
    fd.update(y, real=False)
got_mmd, got_fd = mmd.compute(), fd.compute()
xd, yd = x.double(), y.double()
expected_fd = frechet_distance(*mean_and_covariance(xd.sum(0), xd.T @ xd, 5), *mean_and_covariance(yd.sum(0), yd.T @ yd, 4))[0]
report = json.dumps({"rank": rank, "mmd": float(got_mmd["value"]), "mmd_expected": 1000 * rbf_mmd(x, y),
                  "fd": float(got_fd["value"]), "fd_expected": expected_fd,
                  "counts": [int(got_mmd["num_real"]), int(got_mmd["num_fake"]), int(got_fd["num_real"])]})
for turn in range(dist.get_world_size()):  # one rank at a time: lines of two processes on one pipe can interleave
    if turn == rank:
        print(report, flush=True)
    dist.barrier()
dist.destroy_process_group()
