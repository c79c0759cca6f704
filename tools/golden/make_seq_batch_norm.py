"""Golden data for BatchNorm1d in eval mode: tests/data/seq_batch_norm.pth, the state dict of
`nn.Sequential(BatchNorm1d(6), Linear(6,10), BatchNorm1d(10), ReLU(),
BatchNorm1d(10, affine=False), Linear(10,3))`, every epsilon 1e-3, after a few training-mode batches (running
statistics away from 0 and 1), and tests/data/seq_batch_norm.safetensors: `x` [5, 6] and its
eval-mode `logits` [5, 3].

    python3 tools/golden/make_seq_batch_norm.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(12)
model = torch.nn.Sequential(
    torch.nn.BatchNorm1d(6, eps=1e-3), torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10, eps=1e-3),
    torch.nn.ReLU(), torch.nn.BatchNorm1d(10, eps=1e-3, affine=False), torch.nn.Linear(10, 3))
model.train()
with torch.no_grad():
    for _ in range(4):
        model(torch.randn(32, 6) * 2.0 + 0.5)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.3)
model.eval()
x = torch.randn(5, 6)
with torch.no_grad():
    logits = model(x)
torch.save(model.state_dict(), f"{out}/seq_batch_norm.pth")
save_file({"x": x, "logits": logits}, f"{out}/seq_batch_norm.safetensors")
print("ok")
