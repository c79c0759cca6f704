"""Golden PEFT adapters beyond plain LoRA, on tests/data/seq_d30.pth (`nn.Sequential(Linear(30,48),
GELU(), LayerNorm(48), Linear(48,48), ReLU(), Linear(48,5))`), made with PEFT 0.21.2 and torch
2.15: tests/data/peft_variants/<name>/ (what `save_pretrained` writes) and
tests/data/peft_variants/patterns_rslora_bin/ (the first one saved with
`safe_serialization=False`: `adapter_model.bin`) and
tests/data/peft_variants/logits.safetensors (`x` [8,30] from seq_d30.safetensors, and one
`<name>` [8,5] per adapter: PEFT's logits with it loaded). Every adapter tensor and every
parameter PEFT trains is drawn at random (as if trained), so each one matters.

    python3 tools/golden/make_peft_variants.py tests/data ../shared/ref
"""
import copy
import os
import sys
import torch
import peft
from safetensors.torch import load_file, save_file

out = sys.argv[1]
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(30, 48), torch.nn.GELU(), torch.nn.LayerNorm(48),
                           torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
base.load_state_dict(torch.load(f"{out}/seq_d30.pth"))
base.eval()
x = load_file(f"{out}/seq_d30.safetensors")["x"]
variants = {
    "patterns_rslora": dict(r=4, lora_alpha=8, target_modules=["0", "3", "5"], use_rslora=True,
                            rank_pattern={"3": 2, "^5$": 6}, alpha_pattern={"0": 3}),
    "modules_to_save": dict(r=4, lora_alpha=4, target_modules=["0", "3"], modules_to_save=["5", "2"]),
    "bias_all": dict(r=4, lora_alpha=4, target_modules=["0", "5"], bias="all"),
    "bias_lora_only": dict(r=2, lora_alpha=5, target_modules=["3"], bias="lora_only"),
    # bias = "all" with modules_to_save: PEFT also saves the biases inside each wrapper
    # (`5.modules_to_save.bias`, `5.original_module.bias`), which its loader does not read.
    "bias_all_modules_to_save": dict(r=4, lora_alpha=4, target_modules=["0"],
                                     modules_to_save=["5", "2"], bias="all"),
}
logits = {"x": x}
os.makedirs(f"{out}/peft_variants", exist_ok=True)
for name, kw in variants.items():
    torch.manual_seed(1)
    m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    m.eval()
    with torch.no_grad():
        logits[name] = m(x)
    m.save_pretrained(f"{out}/peft_variants/{name}")
    if name == "patterns_rslora":
        # The same adapter as PEFT writes it without safetensors (adapter_model.bin).
        m.save_pretrained(f"{out}/peft_variants/{name}_bin", safe_serialization=False)
        os.remove(f"{out}/peft_variants/{name}_bin/README.md")
save_file(logits, f"{out}/peft_variants/logits.safetensors")
print("ok")

# BigNet (tests/data/bignet_d128.pth, the reference's Net) with a PEFT adapter that has
# everything at once: per-module rank and alpha, rsLoRA, and bias = "all" (the Linears' and the
# LayerNorms' biases trained): tests/data/peft_variants/bignet_d128/ and `bignet_x` [4,128],
# `bignet_y` [4,128] (PEFT's output) in bignet_d128_io.safetensors.
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402

net = R.Net("bignet", 128)
net.load_state_dict(torch.load(f"{out}/bignet_d128.pth"))
torch.manual_seed(2)
pm = peft.get_peft_model(net, peft.LoraConfig(
    r=4, lora_alpha=6, use_rslora=True, target_modules=r".*\.model\.[024]$",
    rank_pattern={"model.0.model.0": 2}, alpha_pattern={"model.10.model.4": 1}, bias="all"))
with torch.no_grad():
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.05)
pm.eval()
xb = torch.randn(4, 128)
with torch.no_grad():
    yb = pm(xb)
pm.save_pretrained(f"{out}/peft_variants/bignet_d128")
os.remove(f"{out}/peft_variants/bignet_d128/README.md")
save_file({"bignet_x": xb, "bignet_y": yb}, f"{out}/peft_variants/bignet_d128_io.safetensors")
print("ok bignet")
