"""Single-process PyTorch training on synthetic data (CPU).

Fits y = 3x + 1 with a linear model and prints the learned weights; writes
them to ``$HOTWIRE_DATA/single.json`` when a data directory is given.
"""

import json
import os
import sys

import torch

torch.manual_seed(0)
torch.set_num_threads(1)
epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 200
x = torch.randn(256, 1)
y = 3 * x + 1
model = torch.nn.Linear(1, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(epochs):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
w, b = model.weight.item(), model.bias.item()
print(f"trained: w={w:.3f} b={b:.3f} loss={float(loss):.6f}", flush=True)
if os.environ.get("HOTWIRE_DATA"):
    with open(os.path.join(os.environ["HOTWIRE_DATA"], "single.json"), "w") as f:
        json.dump({"w": w, "b": b, "loss": float(loss)}, f)
