"""Run by tests/test_ddp.py under torchrun (2 CPU processes): bf16 weights trained by StochasticAdamW under DDP,
each rank on its own data. Prints one line: whether the replicas' weights are bit-identical after the steps,
and how many weights moved."""

import torch
from accelerate import Accelerator

from zephyr.training.optim import StochasticAdamW

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).bfloat16()
start = torch.cat([p.detach().float().view(-1) for p in model.parameters()])
optimizer = StochasticAdamW(model.parameters(), lr=1e-4, seed=1)
model, optimizer = accelerator.prepare(model, optimizer)
data = torch.Generator().manual_seed(100 + accelerator.process_index)  # every rank its own batches
for _ in range(5):
    x = torch.randn(8, 16, generator=data).bfloat16()
    accelerator.backward(model(x).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()
weights = torch.cat([p.detach().float().view(-1) for p in model.parameters()])
rows = accelerator.gather(weights[None])
if accelerator.is_main_process:
    same = bool(torch.equal(rows[0], rows[1]))
    moved = int((weights != start).sum())
    print(f"processes {accelerator.num_processes} identical {same} moved {moved} of {weights.numel()}")
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: left to interpreter exit, gloo can abort (SIGABRT)
