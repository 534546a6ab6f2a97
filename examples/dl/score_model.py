"""A small PyTorch model (CPU) that scores records for a dl_job PE.

Run by a job that a ``stream.dl_job("scorer", request=...)`` PE starts: it loads
(here: builds, from a fixed seed) the model, then serves batches of records
``{"id": ..., "features": [4 floats]}`` and answers ``{"id": ..., "score": float}``.
"""

import torch

from hotwire.jobs import serve

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
model.eval()


def score(records):
    x = torch.tensor([r["features"] for r in records], dtype=torch.float32)
    with torch.no_grad():
        y = torch.sigmoid(model(x)).squeeze(1)
    return [{"id": r["id"], "score": round(float(s), 6)} for r, s in zip(records, y, strict=True)]


if __name__ == "__main__":
    serve(score, batch=True)
