"""Seeds for the `dataset_reader` fuzz target: small valid data files of each label dtype.

    python3 seeds/make_data_seeds.py seeds/data
"""

import os
import sys

import numpy as np
from safetensors.numpy import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "seeds/data"
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
for dtype in ["int64", "int32", "uint8"]:
    tensors = {
        "x_test": rng.random((3, 4), dtype=np.float32),
        "y_test": np.array([0, 2, 1], dtype=dtype),
        "x_train": rng.random((5, 4), dtype=np.float32),
        "y_train": np.array([1, 0, 2, 2, 1], dtype=dtype),
    }
    save_file(tensors, os.path.join(out, f"small_{dtype}.safetensors"))
save_file({"x_test": rng.random((2, 3), dtype=np.float32), "y_test": np.array([0, 1])},
          os.path.join(out, "test_only.safetensors"))
