"""Seeds for the `adapter_reader` fuzz target: PEFT adapter directories packed into one input,
`u16 LE length of adapter_config.json` + the config + `adapter_model.safetensors`, for the
target's model (Linear "0" 4 -> 3, Linear "2" 3 -> 2).

    python3 seeds/make_adapter_seeds.py seeds/adapter
"""

import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save

out = sys.argv[1] if len(sys.argv) > 1 else "seeds/adapter"
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)


def pack(config: dict, tensors: dict) -> bytes:
    text = json.dumps(config).encode()
    return struct.pack("<H", len(text)) + text + save(tensors)


def lora(module: str, r: int, inp: int, outp: int) -> dict:
    return {
        f"base_model.model.{module}.lora_A.weight": rng.standard_normal((r, inp), dtype=np.float32),
        f"base_model.model.{module}.lora_B.weight": rng.standard_normal((outp, r), dtype=np.float32),
    }


base = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0", "2"]}
both = {**lora("0", 2, 4, 3), **lora("2", 2, 3, 2)}
with open(os.path.join(out, "both.bin"), "wb") as f:
    f.write(pack(base, both))
with open(os.path.join(out, "one_rslora.bin"), "wb") as f:
    f.write(pack({**base, "r": 1, "lora_alpha": 8, "use_rslora": True,
                  "target_modules": ["2"]}, lora("2", 1, 3, 2)))
with open(os.path.join(out, "wrong_shape.bin"), "wb") as f:
    f.write(pack(base, lora("0", 2, 5, 3)))
# DoRA: magnitude vectors beside both layers' A and B.
dora = {**lora("0", 2, 4, 3), **lora("2", 2, 3, 2),
        "base_model.model.0.lora_magnitude_vector": rng.standard_normal(3, dtype=np.float32),
        "base_model.model.2.lora_magnitude_vector": rng.standard_normal(2, dtype=np.float32)}
with open(os.path.join(out, "dora.bin"), "wb") as f:
    f.write(pack({**base, "use_dora": True}, dora))
