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

- tests/data/whole_seq_subclass.pth (a subclass of nn.Sequential: Linear, LayerNorm, SiLU,
  Linear), whole_named_norms.pth (an input BatchNorm1d, then fc → bn → ReLU module → fc → ln →
  GELU module → head: nothing before a norm), whole_named_loss.pth (fc1, SiLU, fc2 and a
  CrossEntropyLoss with class weights registered last: no layer), whole_named_shared_act.pth
  (fc1, fc2, fc3 and one GELU registered last, called after each hidden layer); each with its
  `logits` in `<name>_io.safetensors`; whole_seq_relu6_dropout1d.pth (Linear, Hardtanh(0, 6),
  which is ReLU6, Dropout1d, Linear) likewise.

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


class SequentialSubclass(N.Sequential):
    def __init__(self):
        super().__init__(N.Linear(6, 8), N.LayerNorm(8), N.SiLU(), N.Linear(8, 3))


class NormsBetween(N.Module):
    def __init__(self):
        super().__init__()
        self.bn0 = N.BatchNorm1d(6)
        self.fc1 = N.Linear(6, 8)
        self.bn1 = N.BatchNorm1d(8)
        self.relu = N.ReLU()
        self.fc2 = N.Linear(8, 7)
        self.ln = N.LayerNorm(7)
        self.act = N.GELU()
        self.head = N.Linear(7, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.fc1(self.bn0(x))))
        return self.head(self.act(self.ln(self.fc2(x))))


class WithLoss(N.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = N.Linear(6, 8)
        self.act = N.SiLU()
        self.fc2 = N.Linear(8, 3)
        self.criterion = N.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SharedAct(N.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = N.Linear(6, 8)
        self.fc2 = N.Linear(8, 5)
        self.fc3 = N.Linear(5, 3)
        self.act = N.GELU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


for name, model in (("whole_seq_subclass", SequentialSubclass()), ("whole_named_norms", NormsBetween()),
                    ("whole_named_loss", WithLoss()), ("whole_named_shared_act", SharedAct()),
                    ("whole_seq_relu6_dropout1d",
                     N.Sequential(N.Linear(6, 8), N.Hardtanh(0.0, 6.0), N.Dropout1d(0.1), N.Linear(8, 3)))):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, N.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (N.LayerNorm, N.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.save(model, f"{out}/{name}.pth")
    save_file({"x": x.contiguous(), "logits": logits.contiguous()}, f"{out}/{name}_io.safetensors")
