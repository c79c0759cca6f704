"""Golden data for the reference's LoRA model saved whole (`torch.save(net.state_dict())` after
training: each layer's f16 weight and bias with its `lora_a.weight` / `lora_b.weight`), made
with torch 2.15: tests/data/bignet_lora_sd_d64.pth, a `lora` Net of width 64 whose adapters
(rank 8, not the reference's 32) are drawn at random as if trained, and
tests/data/bignet_lora_sd_io_d64.safetensors: `x` [5, 64] and the Net's output `y`.

    python3 tools/golden/make_lora_state_dict.py tests/data ../shared/ref
"""
import sys
import torch
from safetensors.torch import save_file

out, ref = sys.argv[1], sys.argv[2]
sys.path.insert(0, ref)
import bignet_ref as R  # noqa: E402

D, RANK = 64, 8
torch.manual_seed(17)
net = R.Net("lora", D, r=RANK)
with torch.no_grad():
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn_like(p) * 0.1)
x = torch.randn(5, D)
with torch.no_grad():
    y = net(x)
torch.save(net.state_dict(), f"{out}/bignet_lora_sd_d64.pth")
save_file({"x": x, "y": y.float()}, f"{out}/bignet_lora_sd_io_d64.safetensors")
print("ok", net.model[0].model[0].lora_a.weight.shape)
