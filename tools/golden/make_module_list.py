"""Golden data for a model that loops over an nn.ModuleList of twelve layers, whose keys
(`layers.0` ... `layers.11`) a safetensors file sorts as strings (`layers.10` before
`layers.2`): tests/data/module_list12.pth, the state dict of

    class Net(nn.Module):            # layers.0 -> ReLU -> ... -> layers.11 -> ReLU -> out
        layers = ModuleList([Linear(6, 8)] + [Linear(8, 8)] * 11); out = Linear(8, 3)

(seed 41), read with the default `--activation relu`, and tests/data/module_list12.safetensors
(`x` [5, 6] and its `logits` [5, 3]).

    python3 tools/golden/make_module_list.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

nn = torch.nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6 if i == 0 else 8, 8) for i in range(12)])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x)


out = sys.argv[1]
torch.manual_seed(41)
model = Net().eval()
x = torch.randn(5, 6)
with torch.no_grad():
    logits = model(x)
torch.save(model.state_dict(), f"{out}/module_list12.pth")
save_file({"x": x, "logits": logits}, f"{out}/module_list12.safetensors")
