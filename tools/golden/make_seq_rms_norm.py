"""Golden data for RMSNorms (`--norm rms,layer --rms-norm-eps 1e-3 --activation relu,rms_norm,relu`):
tests/data/seq_rms_norm.pth (the state dict of `nn.Sequential(Linear(6,10), RMSNorm(10),
ReLU(), Linear(10,8), RMSNorm(8, elementwise_affine=False), Linear(8,8), LayerNorm(8), ReLU(),
Linear(8,3))`, every RMSNorm eps 1e-3, the norms' parameters nudged off their init) and
tests/data/seq_rms_norm.safetensors (`x` [5, 6], small so that the epsilon matters, its `logits`
[5, 3], `labels` [5], and the gradients of the mean cross-entropy with respect to x (`dx`) and
to the weights of the RMSNorm and the LayerNorm (`d_w1`, `d_w6`)).

    python3 tools/golden/make_seq_rms_norm.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(17)
nn = torch.nn
model = nn.Sequential(nn.Linear(6, 10), nn.RMSNorm(10, eps=1e-3), nn.ReLU(), nn.Linear(10, 8),
                      nn.RMSNorm(8, eps=1e-3, elementwise_affine=False), nn.Linear(8, 8),
                      nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
with torch.no_grad():
    for i in (1, 6):
        for p in model[i].parameters():
            p.add_(0.3 * torch.randn_like(p))
x = (0.05 * torch.randn(5, 6)).requires_grad_(True)
labels = torch.tensor([2, 0, 1, 1, 0])
logits = model(x)
nn.functional.cross_entropy(logits, labels).backward()
torch.save(model.state_dict(), f"{out}/seq_rms_norm.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad,
           "d_w1": model[1].weight.grad, "d_w6": model[6].weight.grad},
          f"{out}/seq_rms_norm.safetensors")
print(sorted(model.state_dict().keys()))
