"""Distributed data-parallel training with PyTorch DDP on CPU (gloo).

Started by torchrun (the ``pytorch-ddp`` template), one process per replica:
each rank trains on its own shard of synthetic data; DDP averages gradients so
every rank ends with the same weights. Rank 0 prints them and, when a data
directory is given, writes ``$HOTWIRE_DATA/ddp.json``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 100
torch.set_num_threads(1)
dist.init_process_group(backend=os.environ.get("DDP_BACKEND", "gloo"))
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
model = DDP(torch.nn.Linear(1, 1))
g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
x = torch.randn(128, 1, generator=g)
y = 3 * x + 1
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(epochs):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()

w = torch.tensor([model.module.weight.item(), model.module.bias.item()])
gathered = [torch.zeros(2) for _ in range(world)]
dist.all_gather(gathered, w)
same = all(torch.allclose(t, gathered[0]) for t in gathered)
print(
    f"rank {rank}/{world}: w={float(w[0]):.3f} b={float(w[1]):.3f} "
    f"loss={float(loss):.6f} in_sync={same}",
    flush=True,
)
if rank == 0 and os.environ.get("HOTWIRE_DATA"):
    with open(os.path.join(os.environ["HOTWIRE_DATA"], "ddp.json"), "w") as f:
        json.dump({"world_size": world, "w": float(w[0]), "b": float(w[1]), "in_sync": same}, f)
dist.barrier()  # nobody leaves while a peer still talks to it
dist.destroy_process_group()
# Leave without running C++ static destructors: on CPU, gloo's threads can abort
# the process ("terminate called without an active exception") during
# interpreter finalisation even after a clean destroy_process_group().
sys.stdout.flush()
sys.stderr.flush()
os._exit(0 if same else 1)
