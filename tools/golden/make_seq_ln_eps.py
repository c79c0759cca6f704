"""Golden data for `--layer-norm-eps`: tests/data/seq_ln_eps.pth (the state dict of
`nn.Sequential(Linear(6,10), ReLU(), LayerNorm(10, eps=0.05), Linear(10,3))`, whose inputs are
small so that the epsilon matters) and tests/data/seq_ln_eps.safetensors (`x` [5, 6],
`logits` [5, 3]).

    python3 tools/golden/make_seq_ln_eps.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(9)
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(),
                            torch.nn.LayerNorm(10, eps=0.05), torch.nn.Linear(10, 3)).eval()
x = 0.1 * torch.randn(5, 6)
with torch.no_grad():
    logits = model(x)
torch.save(model.state_dict(), f"{out}/seq_ln_eps.pth")
save_file({"x": x, "logits": logits}, f"{out}/seq_ln_eps.safetensors")
print("ok")
