"""A golden DoRA adapter (PEFT's `use_dora`) on tests/data/seq_d30.pth (`nn.Sequential(
Linear(30,48), GELU(), LayerNorm(48), Linear(48,48), ReLU(), Linear(48,5))`), made with PEFT
0.21.2 and torch 2.15: tests/data/peft_variants/dora/ (what `save_pretrained` writes: r 4,
lora_alpha 8, rank 2 on module 3, on 0, 3 and 5, `bias = "all"`) and
tests/data/peft_variants/dora_logits.safetensors (`x` [8,30] from seq_d30.safetensors and
PEFT's `logits` [8,5] with the adapter loaded). Every tensor PEFT trains (A, B, the magnitude
vectors, the biases) is drawn at random, as if trained, so each one matters.

    python3 tools/golden/make_peft_dora.py tests/data
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
torch.manual_seed(3)
m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["0", "3", "5"], rank_pattern={"3": 2}, use_dora=True,
    bias="all"))
with torch.no_grad():
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.2)
m.eval()
with torch.no_grad():
    logits = m(x)
m.save_pretrained(f"{out}/peft_variants/dora")
os.remove(f"{out}/peft_variants/dora/README.md")
save_file({"x": x, "logits": logits}, f"{out}/peft_variants/dora_logits.safetensors")
print(sorted(load_file(f"{out}/peft_variants/dora/adapter_model.safetensors").keys()))
