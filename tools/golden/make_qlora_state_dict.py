"""Golden data for the reference's QLoRA model saved whole after training, made with torch
2.15: `torch.save(net.state_dict())` of a `qlora` Net of width 64 holds its biases, LayerNorms
and adapters but not its 4-bit weights (buffers with `persistent=False`), so the base comes from
the f32 state dict it was loaded from.

- tests/data/bignet_qlora_base_d64.pth: the f32 `bignet` state dict (seed 19);
- tests/data/bignet_qlora_sd_d64.pth: the qlora Net loaded from it (`bignet_ref.load`),
  adapters (rank 32) drawn at random as if trained, saved whole;
- tests/data/bignet_qlora_sd_io_d64.safetensors: `x` [5, 64] and the qlora Net's output `y`.

    python3 tools/golden/make_qlora_state_dict.py tests/data ../shared/ref
"""
import sys
import torch
from safetensors.torch import save_file

out, ref = sys.argv[1], sys.argv[2]
sys.path.insert(0, ref)
import bignet_ref as R  # noqa: E402

D = 64
torch.manual_seed(19)
base = R.Net("bignet", D)
torch.save(base.state_dict(), f"{out}/bignet_qlora_base_d64.pth")
net = R.load("qlora", base.state_dict(), dim=D)
with torch.no_grad():
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn_like(p) * 0.05)
x = torch.randn(5, D)
with torch.no_grad():
    y = net(x)
torch.save(net.state_dict(), f"{out}/bignet_qlora_sd_d64.pth")
save_file({"x": x, "y": y.float()}, f"{out}/bignet_qlora_sd_io_d64.safetensors")
print("ok", sorted(net.state_dict().keys())[:4])
