"""Golden data for `bignet fit --adapter` over PEFT adapters whose scaling is not 1.

PEFT scales B·A by lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora, or an
alpha_pattern entry); nibble folds that scale into B and tells AdamW, so that its steps are
PEFT's steps on B. This script makes two such adapters on the width-20 BigNet of
`tests/data/bignet_d20.pth` (lora_alpha = 2r; rsLoRA with an alpha_pattern entry), trains
each with PyTorch's AdamW (lr 1e-3) for 8 steps on the task `bignet fit --seed 3` trains on
(its data and head rebuilt here with nibble's generator, `nibble_tensor::Rng`), and writes
the adapters and PEFT's losses to `tests/data/peft_fit_scaled/` (test:
`crates/bignet/tests/cli.rs`, `fit_trains_scaled_peft_adapters_as_peft_does`).

Run from the repository root with torch and peft installed:
    python tools/golden/make_peft_fit_scaled.py /path/to/shared/ref
"""
import json, math, shutil, sys

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "../shared/ref")
import bignet_ref as R  # noqa: E402

M = (1 << 64) - 1


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M


class Rng:
    """nibble_tensor::Rng: xoshiro256++ seeded by splitmix64, Box-Muller normals."""

    def __init__(self, seed):
        z = seed & M
        s = []
        for _ in range(4):
            z = (z + 0x9E3779B97F4A7C15) & M
            x = z
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
            s.append(x ^ (x >> 31))
        self.s = s
        self.spare = None

    @staticmethod
    def fork(seed, stream):
        return Rng(seed ^ rotl((stream * 0xD1B54A32D192ED03) & M, 17))

    def next_u64(self):
        s = self.s
        r = (rotl((s[0] + s[3]) & M, 23) + s[0]) & M
        t = (s[1] << 17) & M
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return r

    def next_f32(self):
        return np.float32(self.next_u64() >> 40) * np.float32(1.0 / (1 << 24))

    def uniform(self, lo, hi):
        lo, hi = np.float32(lo), np.float32(hi)
        v = np.float32(lo + np.float32(hi - lo) * self.next_f32())
        return lo if v >= hi else v

    def normal(self):
        if self.spare is not None:
            v, self.spare = self.spare, None
            return v
        u1 = ((self.next_u64() >> 11) + 1.0) * (1.0 / (1 << 53))
        u2 = (self.next_u64() >> 11) * (1.0 / (1 << 53))
        r, th = math.sqrt(-2.0 * math.log(u1)), 2.0 * math.pi * u2
        self.spare = np.float32(r * math.sin(th))
        return np.float32(r * math.cos(th))


def fit_task(dim, samples, seed):
    """nibble_bignet::train::FitTask::new(dim, samples, seed): the head and the inputs."""
    rng = Rng.fork(seed, 0xF17)
    bound = np.float32(1.0) / np.sqrt(np.float32(dim))
    head = np.array([rng.uniform(-bound, bound) for _ in range(dim)], dtype=np.float32)
    x = np.array([rng.normal() for _ in range(samples * dim)], dtype=np.float32)
    return torch.from_numpy(head.reshape(1, dim)), torch.from_numpy(x.reshape(samples, dim))


def peft_fit(model, head, x, steps, lr=1e-3):
    y = torch.cat([torch.zeros(500), torch.ones(500)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits((model(x) @ head.T).squeeze(-1), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    torch.set_num_threads(1)
    dim, seed, steps = 20, 3, 8
    out = "tests/data/peft_fit_scaled"
    sd = torch.load("tests/data/bignet_d20.pth")
    head, x = fit_task(dim, 1000, seed)
    targets = r"model\.\d+\.model\.[024]"
    configs = {
        "alpha_2r": dict(r=4, lora_alpha=8, target_modules=targets),
        "rslora_pattern": dict(
            r=4, lora_alpha=4, use_rslora=True, target_modules=targets,
            alpha_pattern={"model.2.model.2": 32},
        ),
    }
    losses = {}
    for name, cfg in configs.items():
        torch.manual_seed(1)
        model = get_peft_model(R.load("bignet", sd, dim), LoraConfig(**cfg))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        shutil.rmtree(f"{out}/{name}", ignore_errors=True)
        model.save_pretrained(f"{out}/{name}")
        losses[name] = peft_fit(model, head, x, steps)
    with open(f"{out}/losses.json", "w") as f:
        json.dump({"dim": dim, "seed": seed, "steps": steps, "lr": 1e-3, "losses": losses}, f, indent=1)


if __name__ == "__main__":
    main()
