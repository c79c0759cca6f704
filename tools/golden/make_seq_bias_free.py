"""Golden data for `nibble` on layers without a bias: tests/data/seq_bias_free.pth (the state
dict of the Sequential below, as torch.save writes it) and tests/data/seq_bias_free.safetensors
(`x` [8, 13], `labels` [8] i64, `logits` [8, 4], `loss` [1]: mean cross-entropy).

    python3 tools/golden/make_seq_bias_free.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(7)
model = torch.nn.Sequential(
    torch.nn.Linear(13, 20, bias=False),
    torch.nn.ReLU(),
    torch.nn.LayerNorm(20, bias=False),
    torch.nn.Linear(20, 9),
    torch.nn.ReLU(),
    torch.nn.Linear(9, 4, bias=False),
)
with torch.no_grad():
    model[2].weight.uniform_(0.5, 1.5)  # not the ones of the init
model.eval()
x = torch.randn(8, 13)
labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
with torch.no_grad():
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, labels)
torch.save(model.state_dict(), f"{out}/seq_bias_free.pth")
save_file({"x": x, "labels": labels, "logits": logits, "loss": loss.reshape(1)},
          f"{out}/seq_bias_free.safetensors")
print(sorted(model.state_dict().keys()))
