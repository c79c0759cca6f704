"""Golden data for LayerNorms without parameters (`--activation layer_norm+relu,layer_norm`):
tests/data/seq_plain_norm.pth (the state dict of `nn.Sequential(Linear(6,10),
LayerNorm(10, elementwise_affine=False, eps=0.05), ReLU(), Linear(10,8),
LayerNorm(8, elementwise_affine=False, eps=0.05), Linear(8,3))`: the parameter-free layers
leave gaps at indices 1-2 and 4) and tests/data/seq_plain_norm.safetensors (`x` [5, 6], small
so that the epsilon matters, its `logits` [5, 3], `labels` [5] and the gradient `dx` [5, 6] of
the mean cross-entropy with respect to x).

    python3 tools/golden/make_seq_plain_norm.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(13)
nn = torch.nn
model = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10, elementwise_affine=False, eps=0.05),
                      nn.ReLU(), nn.Linear(10, 8),
                      nn.LayerNorm(8, elementwise_affine=False, eps=0.05),
                      nn.Linear(8, 3)).eval()
x = (0.1 * torch.randn(5, 6)).requires_grad_(True)
labels = torch.tensor([0, 2, 1, 1, 0])
logits = model(x)
nn.functional.cross_entropy(logits, labels).backward()
torch.save(model.state_dict(), f"{out}/seq_plain_norm.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad},
          f"{out}/seq_plain_norm.safetensors")
print(sorted(model.state_dict().keys()))
