"""Golden PEFT DoRA adapter on the reference's BigNet at width 128 (tests/data/bignet_d128.pth):
tests/data/peft_variants/dora_bignet/ (`use_dora`, r=4, lora_alpha=8 on every Linear, rank 2 on
model.2.model.2; A, B and `lora_magnitude_vector` drawn at random, as if trained) and
tests/data/peft_variants/dora_bignet_io.safetensors: `x` [4,128], PEFT's output `y` with the
adapter loaded (eval mode) and `merged` (its `merge_and_unload()` model's output). Made with
PEFT 0.21.2 and torch.

    python3 tools/golden/make_peft_dora_bignet.py tests/data ../shared/ref
"""
import os
import sys
import torch
import peft
from safetensors.torch import save_file

out = sys.argv[1]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402

net = R.Net("bignet", 128)
net.load_state_dict(torch.load(f"{out}/bignet_d128.pth"))
net.eval()
torch.manual_seed(5)
pm = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                              target_modules=r".*\.model\.[024]$",
                                              rank_pattern={"model.2.model.2": 2}))
with torch.no_grad():
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * (0.05 if "magnitude" not in n else 0.1))
pm.eval()
x = torch.randn(4, 128)
with torch.no_grad():
    y = pm(x)
pm.save_pretrained(f"{out}/peft_variants/dora_bignet")
os.remove(f"{out}/peft_variants/dora_bignet/README.md")
merged = pm.merge_and_unload()
with torch.no_grad():
    ym = merged(x)
save_file({"x": x, "y": y, "merged": ym}, f"{out}/peft_variants/dora_bignet_io.safetensors")
print("ok", (y - ym).abs().max().item())
