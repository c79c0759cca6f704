"""Training checkpoints that keep the state dict under a key (PyTorch's tutorial format and
Lightning's), for the `.pth` reader: tests/data/ckpt_*.pth, all of the model
`nn.Sequential(Linear(4,3), ReLU(), Linear(3,2))` (seed 21) after one Adam step:

- ckpt_tutorial.pth: {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt, "loss": 0.25}
- ckpt_lightning.pth: {"epoch": 1, "global_step": 10, "state_dict": {"model." + k: v},
  "pytorch-lightning_version": "2.4.0", "loops": {}}
- ckpt_two_models.pth: {"model": sd, "ema": sd with every value halved, "step": 7} ("model" is
  read: it is named first)
- ckpt_ambiguous.pth: {"generator": sd, "discriminator": sd with every value doubled} (no
  preferred name: refused)
- ckpt_no_state_dict.pth: {"epoch": 3, "optimizer_state_dict": opt} (refused)
- ckpt_hparams.pth: Lightning-style, with a `hyper_parameters` AttributeDict and an
  `argparse.Namespace` beside the state dict (read: those objects are kept opaque)

and tests/data/ckpt_x.safetensors: `x` [2,4] and the model's `logits` [2,2].

    python3 tools/golden/make_training_checkpoints.py tests/data
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(21)
m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
opt = torch.optim.Adam(m.parameters(), lr=0.1)
m(torch.randn(5, 4)).pow(2).sum().backward()
opt.step()
m.eval()
sd = m.state_dict()
x = torch.randn(2, 4)
with torch.no_grad():
    logits = m(x)
torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(),
            "loss": 0.25}, f"{out}/ckpt_tutorial.pth")
torch.save({"epoch": 1, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "pytorch-lightning_version": "2.4.0", "loops": {}}, f"{out}/ckpt_lightning.pth")
torch.save({"model": sd, "ema": {k: v / 2 for k, v in sd.items()}, "step": 7},
           f"{out}/ckpt_two_models.pth")
torch.save({"generator": sd, "discriminator": {k: 2 * v for k, v in sd.items()}},
           f"{out}/ckpt_ambiguous.pth")
torch.save({"epoch": 3, "optimizer_state_dict": opt.state_dict()}, f"{out}/ckpt_no_state_dict.pth")
save_file({"x": x, "logits": logits}, f"{out}/ckpt_x.safetensors")
print("ok")

# Lightning's hyperparameters object and an argparse.Namespace beside the state dict
# (ckpt_hparams.pth): classes the reader keeps opaque. The AttributeDict here is a stand-in
# under Lightning's module path, pickled as Lightning's is (a dict subclass).
import argparse
import pickle
import types

for name in ["lightning", "lightning.fabric", "lightning.fabric.utilities",
             "lightning.fabric.utilities.data"]:
    sys.modules.setdefault(name, types.ModuleType(name))


class AttributeDict(dict):
    pass


AttributeDict.__module__ = "lightning.fabric.utilities.data"
AttributeDict.__qualname__ = "AttributeDict"
sys.modules["lightning.fabric.utilities.data"].AttributeDict = AttributeDict
torch.save({"epoch": 2, "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "hyper_parameters": AttributeDict(lr=0.1, hidden=3),
            "args": argparse.Namespace(seed=21, layers=[4, 3, 2])},
           f"{out}/ckpt_hparams.pth")
print("ok hparams")
