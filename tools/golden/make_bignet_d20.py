"""Golden data for Q4 at a width that is not a multiple of 16: tests/data/bignet_d20.pth (the
reference's BigNet at width 20, `torch.save(net.state_dict())`) and
tests/data/io_d20.safetensors (`x` [7, 20] and `y.<variant>` [7, 20] for bignet,
low_precision and qlora: the reference's outputs). At width 20 the reference's `q4_quantize`
blocks of 16 over the flattened weight cross rows; the qlora model's `lora_b` is drawn at
random (as if trained) so that its adapters matter, and saved in `tests/data/bignet_d20_qlora.pth`
(its state dict, which holds no 4-bit buffers).

    python3 tools/golden/make_bignet_d20.py tests/data ../shared/ref
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402

torch.manual_seed(20)
net = R.Net("bignet", 20)
sd = net.state_dict()
torch.save(sd, f"{out}/bignet_d20.pth")
x = torch.randn(7, 20)
ys = {"x": x}
with torch.no_grad():
    for kind in ("bignet", "low_precision"):
        ys[f"y.{kind}"] = R.load(kind, sd, 20)(x)
    q = R.load("qlora", sd, 20)
    for n, p in q.named_parameters():
        if "lora_b" in n:
            p.normal_(0, 0.05)
    ys["y.qlora"] = q(x)
torch.save(q.state_dict(), f"{out}/bignet_d20_qlora.pth")
save_file(ys, f"{out}/io_d20.safetensors")
print("ok")
