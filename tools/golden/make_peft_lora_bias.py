"""Golden PEFT adapters with `lora_bias=True` (a bias on every lora_B, trained, scaled with the
product): tests/data/peft_variants/lora_bias/ on tests/data/seq_d30.pth (r=4, lora_alpha=8 on
Linears 0 and 5: scaling 2; rank_pattern 3 -> 2 with alpha_pattern 3 -> 1), and
tests/data/peft_variants/lora_bias_free/ on tests/data/seq_bias_free.pth (whose Linears 0 and 5
have no bias of their own; every Linear adapted, rsLoRA); logits in
tests/data/peft_variants/lora_bias_logits.safetensors (`x_d30` [8,30], `lora_bias` [8,5],
`x_free` [8,13], `lora_bias_free` [8,4]): PEFT's with the adapter loaded. Every adapter tensor is drawn at random (as if trained), lora_B's bias included.
Also the reference's BigNet at width 128 (tests/data/bignet_d128.pth) with a lora_bias adapter
on every Linear (r=4, lora_alpha=8): tests/data/peft_variants/lora_bias_bignet/ and
`bignet_x` [4,128], `bignet_y` (PEFT's output), `bignet_merged` (PEFT's merge_and_unload
model's output) in lora_bias_logits.safetensors. Made with PEFT 0.21.2 and torch.

    python3 tools/golden/make_peft_lora_bias.py tests/data ../shared/ref
"""
import copy
import os
import sys
import torch
import peft
from safetensors.torch import load_file, save_file

out = sys.argv[1]
seq_d30 = torch.nn.Sequential(torch.nn.Linear(30, 48), torch.nn.GELU(), torch.nn.LayerNorm(48),
                              torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
seq_d30.load_state_dict(torch.load(f"{out}/seq_d30.pth"))
free = torch.nn.Sequential(torch.nn.Linear(13, 20, bias=False), torch.nn.ReLU(),
                           torch.nn.LayerNorm(20, bias=False), torch.nn.Linear(20, 9),
                           torch.nn.ReLU(), torch.nn.Linear(9, 4, bias=False))
free.load_state_dict(torch.load(f"{out}/seq_bias_free.pth"))
cases = {
    "lora_bias": (seq_d30, load_file(f"{out}/seq_d30.safetensors")["x"], "x_d30",
                  dict(r=4, lora_alpha=8, target_modules=["0", "3", "5"], lora_bias=True,
                       rank_pattern={"3": 2}, alpha_pattern={"3": 1})),
    "lora_bias_free": (free, load_file(f"{out}/seq_bias_free.safetensors")["x"], "x_free",
                       dict(r=3, lora_alpha=5, target_modules="all-linear", use_rslora=True,
                            lora_bias=True)),
}
logits = {}
for name, (base, x, xkey, kw) in cases.items():
    base.eval()
    torch.manual_seed(3)
    m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    m.eval()
    with torch.no_grad():
        logits[xkey] = x
        logits[name] = m(x)
    m.save_pretrained(f"{out}/peft_variants/{name}")
    os.remove(f"{out}/peft_variants/{name}/README.md")
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402

net = R.Net("bignet", 128)
net.load_state_dict(torch.load(f"{out}/bignet_d128.pth"))
net.eval()
torch.manual_seed(4)
pm = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.model\.[024]$",
                                              lora_bias=True))
with torch.no_grad():
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.05)
pm.eval()
xb = torch.randn(4, 128)
with torch.no_grad():
    logits["bignet_x"] = xb
    logits["bignet_y"] = pm(xb)
pm.save_pretrained(f"{out}/peft_variants/lora_bias_bignet")
os.remove(f"{out}/peft_variants/lora_bias_bignet/README.md")
merged = pm.merge_and_unload()
with torch.no_grad():
    logits["bignet_merged"] = merged(xb)
save_file(logits, f"{out}/peft_variants/lora_bias_logits.safetensors")
print("ok")
