"""Run by tests/test_ddp.py under torchrun (2 CPU processes): bf16 weights sharded by FSDP2 (per-parameter
DTensor shards, by rows, the second shard of an odd row count shorter) and trained by StochasticAdamW, every
rank on the same batches; next to them one process trains an unsharded copy. Rank 0 prints where each rank's
shards start, then whether the gathered sharded weights are bit-identical to the unsharded ones, and how
many weights moved."""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from zephyr.training.optim import StochasticAdamW, shard_start


def train(model: torch.nn.Module) -> None:
    optimizer = StochasticAdamW(model.parameters(), lr=1e-3, seed=1)
    data = torch.Generator().manual_seed(100)  # the same batches everywhere: equal gradients
    for _ in range(5):
        x = torch.randn(8, 16, generator=data).bfloat16()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
start = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).bfloat16()
alone, sharded = copy.deepcopy(start), copy.deepcopy(start)
for layer in (sharded[0], sharded[2], sharded):
    fully_shard(layer, mesh=mesh)
# rank 0 prints every rank's starts: two processes printing to one pipe could interleave their lines
starts: list = [None] * dist.get_world_size()
dist.all_gather_object(starts, [shard_start(p) for p in sharded.parameters()])
if dist.get_rank() == 0:
    for rank, rank_starts in enumerate(starts):
        print(f"rank {rank} shard starts {rank_starts}", flush=True)
train(alone)
train(sharded)
gathered = torch.cat([p.full_tensor().detach().float().view(-1) for p in sharded.parameters()])
weights = torch.cat([p.detach().float().view(-1) for p in alone.parameters()])
before = torch.cat([p.detach().float().view(-1) for p in start.parameters()])
if dist.get_rank() == 0:
    same = bool(torch.equal(gathered, weights))
    moved = int((weights != before).sum())
    print(
        f"processes {dist.get_world_size()} identical {same} moved {moved} of {weights.numel()}", flush=True
    )
dist.barrier()
dist.destroy_process_group()
