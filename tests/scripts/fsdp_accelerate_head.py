"""Run by tests/test_ddp.py under torchrun (2 CPU processes): a tiny Llama sharded the way `accelerate` shards
it for FSDP2 (a group per decoder layer, the final norm and LM head in a group left unsharded after forward),
trained through zephyr's chunked log-probs, each rank on its own batch and a different number of LM-head
chunks. Prints the largest difference between the sharded gradients and those of one process over both
batches, with the largest of those gradients (the size its tolerance scales with), then the dtype of bf16
weights after accelerate's preparation without and with mixed precision."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import make_tiny_llama
from zephyr.data.packing import collate_packed
from zephyr.scoring.attention import register_packed_attention
from zephyr.scoring.forward import token_logps


def model() -> torch.nn.Module:
    m = make_tiny_llama(300, seed=0)
    m.set_attn_implementation(register_packed_attention())
    return m.train()


def shard(m: torch.nn.Module, mixed_precision: str) -> torch.nn.Module:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", cpu_ram_efficient_loading=False
    )
    accelerator = SimpleNamespace(  # what fsdp2_prepare_model reads of an Accelerator
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision=mixed_precision,
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, m)


torch.set_num_threads(1)
dist.init_process_group("gloo")
PartialState(cpu=True)  # accelerate's logging, which the preparation uses, needs its state
rank, world = dist.get_rank(), dist.get_world_size()
batches = [
    collate_packed(
        [(torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(r)).tolist(), [1] * n)]
    )
    for r, n in enumerate((14, 5))  # 13 and 4 targets: 4 and 1 chunks of 4
]
alone = model()
(sum(-token_logps(alone, b, chunk_size=4).sum() for b in batches) / world).backward()
sharded = shard(model(), "no")
(-token_logps(sharded, batches[rank], chunk_size=4).sum()).backward()
expected = dict(alone.named_parameters())
worst = max(
    (p.grad.full_tensor() - expected[n].grad).abs().max().item() for n, p in sharded.named_parameters()
)
largest = max(p.grad.abs().max().item() for p in alone.parameters())
dtypes = {mp: {str(p.dtype) for p in shard(model().bfloat16(), mp).parameters()} for mp in ("no", "bf16")}
if rank == 0:
    print(f"max grad difference {worst:.3g} largest grad {largest:.3g}", flush=True)
    print(
        f"bf16 weights under mixed precision no {sorted(dtypes['no'])} bf16 {sorted(dtypes['bf16'])}",
        flush=True,
    )
dist.barrier()
dist.destroy_process_group()
