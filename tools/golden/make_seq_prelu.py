"""Golden data for PReLUs (`--norm prelu,layer,prelu`): tests/data/seq_prelu.pth, the state dict
of `nn.Sequential(Linear(6,10), PReLU(10), Linear(10,8), LayerNorm(8, bias=False), PReLU(),
Linear(8,3))` (seed 29, the slopes and the LayerNorm's weight drawn off their init; no gaps:
indices 1, 3 and 4 are each one 1-D weight, which a state dict cannot tell apart), and
tests/data/seq_prelu.safetensors (`x` [5, 6], its `logits` [5, 3], `labels` [5], and the
gradients of the mean cross-entropy with respect to x (`dx`) and the slopes (`d_w1` [10],
`d_w4` [1])).

    python3 tools/golden/make_seq_prelu.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(29)
nn = torch.nn
model = nn.Sequential(nn.Linear(6, 10), nn.PReLU(10), nn.Linear(10, 8),
                      nn.LayerNorm(8, bias=False), nn.PReLU(), nn.Linear(8, 3)).eval()
with torch.no_grad():
    model[1].weight.copy_(torch.rand(10) * 0.8 - 0.2)
    model[3].weight.add_(0.3 * torch.randn(8))
    model[4].weight.fill_(0.6)
x = torch.randn(5, 6).requires_grad_(True)
labels = torch.tensor([1, 0, 2, 2, 1])
logits = model(x)
nn.functional.cross_entropy(logits, labels).backward()
torch.save(model.state_dict(), f"{out}/seq_prelu.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad,
           "d_w1": model[1].weight.grad, "d_w4": model[4].weight.grad},
          f"{out}/seq_prelu.safetensors")
print({k: tuple(v.shape) for k, v in model.state_dict().items()})
