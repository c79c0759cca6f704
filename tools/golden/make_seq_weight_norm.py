"""Golden data for weight-normalized Linears: tests/data/seq_weight_norm.pth, the state dict
of `nn.Sequential(weight_norm(Linear(6,10)), ReLU(), weight_norm(Linear(10,8), dim=1), ReLU(),
weight_norm(Linear(8,3), dim=None))`, the first and last with
`torch.nn.utils.parametrizations.weight_norm` (keys `parametrizations.weight.original0` /
`original1`), the middle one with the older `torch.nn.utils.weight_norm` (`weight_g` /
`weight_v`), every g nudged off its init; and tests/data/seq_weight_norm.safetensors (`x`
[5, 6] and its `logits` [5, 3]).

    python3 tools/golden/make_seq_weight_norm.py tests/data
"""
import sys
import warnings
import torch
from safetensors.torch import save_file
from torch.nn.utils.parametrizations import weight_norm

out = sys.argv[1]
torch.manual_seed(23)
nn = torch.nn
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    middle = torch.nn.utils.weight_norm(nn.Linear(10, 8), dim=1)
model = nn.Sequential(weight_norm(nn.Linear(6, 10)), nn.ReLU(), middle, nn.ReLU(),
                      weight_norm(nn.Linear(8, 3), dim=None)).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "original0" in name or name.endswith("weight_g"):
            p.mul_(1.0 + 0.5 * torch.rand_like(p))
x = torch.randn(5, 6)
with torch.no_grad():
    logits = model(x)
torch.save(model.state_dict(), f"{out}/seq_weight_norm.pth")
save_file({"x": x, "logits": logits}, f"{out}/seq_weight_norm.safetensors")
print({k: tuple(v.shape) for k, v in model.state_dict().items()})
