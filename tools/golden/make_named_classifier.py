"""Golden data for a classifier of its own class (named modules, not an nn.Sequential):
tests/data/named_classifier.pth, the state dict of

    class Net(nn.Module):            # fc1 -> bn1 -> ReLU -> fc2 -> norm -> GELU -> head
        fc1 = Linear(6, 12); bn1 = BatchNorm1d(12); fc2 = Linear(12, 8); norm = LayerNorm(8)
        head = Linear(8, 3)

in eval mode (seed 31, the norms' parameters and statistics nudged off their init), read with
`--activation identity,relu,identity,gelu` (what runs between each two modules, in the order
the state dict keeps them), and tests/data/named_classifier.safetensors (`x` [5, 6], its
`logits` [5, 3], `labels` [5], and the mean cross-entropy's gradient `dx`).

    python3 tools/golden/make_named_classifier.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

nn = torch.nn
F = torch.nn.functional


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.gelu(self.norm(self.fc2(x)))
        return self.head(x)


out = sys.argv[1]
torch.manual_seed(31)
model = Net()
with torch.no_grad():
    for m in (model.bn1, model.norm):
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.bn1.running_mean.copy_(0.2 * torch.randn(12))
    model.bn1.running_var.copy_(0.5 + torch.rand(12))
model.eval()
x = torch.randn(5, 6).requires_grad_(True)
labels = torch.tensor([2, 0, 1, 1, 0])
logits = model(x)
F.cross_entropy(logits, labels).backward()
torch.save(model.state_dict(), f"{out}/named_classifier.pth")
save_file({"x": x.detach(), "logits": logits.detach(), "labels": labels, "dx": x.grad},
          f"{out}/named_classifier.safetensors")
print(list(model.state_dict().keys()))
