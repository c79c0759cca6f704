"""Whole pickled models of their own classes (named modules, not an nn.Sequential), for what
`nibble` reads of their gaps from the pickle:

- tests/data/whole_named.pth: `features = nn.Sequential(Linear(6, 9), GELU(), Linear(9, 7),
  Tanh())`, `norm = nn.RMSNorm(7, eps=1e-4)`, `act = nn.SiLU()`, `head = Linear(7, 3)`, run as
  `head(act(norm(features(x))))`: every gap is certain from the pickle (GELU and Tanh inside
  the Sequential, SiLU registered between the norm and the head), and the RMSNorm's kind and
  eps too; its `logits` on the `x` [5, 6] of tests/data/whole_mix_io.safetensors in tests/data/whole_named_io.safetensors.
- tests/data/whole_named_dropout.pth: `fc1 = Linear(6, 8)`, `drop = nn.Dropout(0.1)`,
  `fc2 = Linear(8, 3)`, run as `fc2(drop(F.relu(fc1(x))))`: a Dropout alone between two layers
  says nothing of a functional activation beside it (relu, the default, stays); its `logits`
  in tests/data/whole_named_dropout_io.safetensors.
- tests/data/whole_softplus_beta.pth: an nn.Sequential of Linear(6, 4), Softplus(beta=2),
  Linear(4, 3): nibble computes Softplus only with beta 1 (the error names the setting).

    python3 tools/golden/make_whole_named.py tests/data
"""
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

N = torch.nn
out = sys.argv[1]


class Named(N.Module):
    def __init__(self):
        super().__init__()
        self.features = N.Sequential(N.Linear(6, 9), N.GELU(), N.Linear(9, 7), N.Tanh())
        self.norm = N.RMSNorm(7, eps=1e-4)
        self.act = N.SiLU()
        self.head = N.Linear(7, 3)

    def forward(self, x):
        return self.head(self.act(self.norm(self.features(x))))


class WithDropout(N.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = N.Linear(6, 8)
        self.drop = N.Dropout(0.1)
        self.fc2 = N.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


torch.manual_seed(21)
# The x of tests/data/whole_mix_io.safetensors, which the test's data file holds.
x = load_file(f"{out}/whole_mix_io.safetensors")["x"]
for name, model in (("whole_named", Named()), ("whole_named_dropout", WithDropout())):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] == 7:
                p.uniform_(0.5, 1.5)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.save(model, f"{out}/{name}.pth")
    save_file({"x": x.contiguous(), "logits": logits.contiguous()}, f"{out}/{name}_io.safetensors")
torch.save(N.Sequential(N.Linear(6, 4), N.Softplus(beta=2), N.Linear(4, 3)), f"{out}/whole_softplus_beta.pth")
