"""Golden data for GroupNorms (`--norm group:4,layer,group:2 --layer-norm-eps 1e-3
--activation relu,gelu,relu`): tests/data/seq_group_norm.pth (the state dict of
`nn.Sequential(Linear(6,12), GroupNorm(4,12), ReLU(), Linear(12,8), LayerNorm(8), GELU(),
Linear(8,6), GroupNorm(2,6), ReLU(), Linear(6,3))`, every norm's eps 1e-3, the norms'
parameters nudged off their init) and tests/data/seq_group_norm.safetensors (`x` [5, 6], small so
that the epsilon matters, its `logits` [5, 3], `labels` [5], and the gradients of the mean
cross-entropy with respect to x (`dx`) and to the GroupNorms' weights and biases (`d_w1`, `d_b1`,
`d_w7`, `d_b7`)); and a GroupNorm without parameters (`--activation group_norm:3+relu
--layer-norm-eps 1e-3`): tests/data/seq_group_norm_plain.pth (`nn.Sequential(Linear(6,12),
GroupNorm(3,12, affine=False), ReLU(), Linear(12,3))`, eps 1e-3) and
tests/data/seq_group_norm_plain.safetensors (`x` [5, 6], `logits`, `labels`, `dx`).

    python3 tools/golden/make_seq_group_norm.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(23)
nn = torch.nn
model = nn.Sequential(nn.Linear(6, 12), nn.GroupNorm(4, 12, eps=1e-3), nn.ReLU(), nn.Linear(12, 8),
                      nn.LayerNorm(8, eps=1e-3), nn.GELU(), nn.Linear(8, 6),
                      nn.GroupNorm(2, 6, eps=1e-3), nn.ReLU(), nn.Linear(6, 3)).eval()
with torch.no_grad():
    for i in (1, 4, 7):
        for p in model[i].parameters():
            p.add_(0.3 * torch.randn_like(p))
x = (0.05 * torch.randn(5, 6)).requires_grad_(True)
labels = torch.tensor([2, 0, 1, 1, 0])
logits = model(x)
nn.functional.cross_entropy(logits, labels).backward()
torch.save(model.state_dict(), f"{out}/seq_group_norm.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad,
           "d_w1": model[1].weight.grad, "d_b1": model[1].bias.grad,
           "d_w7": model[7].weight.grad, "d_b7": model[7].bias.grad},
          f"{out}/seq_group_norm.safetensors")
print(sorted(model.state_dict().keys()))

torch.manual_seed(29)
plain = nn.Sequential(nn.Linear(6, 12), nn.GroupNorm(3, 12, eps=1e-3, affine=False), nn.ReLU(),
                      nn.Linear(12, 3)).eval()
x = (0.05 * torch.randn(5, 6)).requires_grad_(True)
logits = plain(x)
nn.functional.cross_entropy(logits, labels).backward()
torch.save(plain.state_dict(), f"{out}/seq_group_norm_plain.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad},
          f"{out}/seq_group_norm_plain.safetensors")
print(sorted(plain.state_dict().keys()))
