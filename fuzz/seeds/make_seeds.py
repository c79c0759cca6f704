"""Small seed inputs for the fuzz targets, made without torch: a fake `torch` module whose
globals pickle under the same names torch.save uses.

  python3 make_seeds.py OUT_DIR
"""
import collections, io, json, pickle, struct, sys, types, zipfile

out = sys.argv[1]
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


def _rebuild_parameter(*args):
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = _rebuild_parameter.__module__ = "torch._utils"
utils._rebuild_tensor_v2, utils._rebuild_parameter = _rebuild_tensor_v2, _rebuild_parameter
storage_types = {}
for name, size in [("FloatStorage", 4), ("HalfStorage", 2), ("LongStorage", 8), ("ByteStorage", 1),
                   ("BFloat16Storage", 2), ("BoolStorage", 1)]:
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    storage_types[name] = (cls, size)


class Storage:
    def __init__(self, kind, key, numel):
        self.cls, self.size = storage_types[kind]
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, storage, offset, size, stride, param=False):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.param = param

    def __reduce__(self):
        t = (_rebuild_tensor_v2, self.args)
        if self.param:
            return (_rebuild_parameter, (Rebuilt(t), False, collections.OrderedDict()))
        return t


class Rebuilt:
    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        return self.t


class P(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def pth(path, sd, storages, protocol=2):
    buf = io.BytesIO()
    P(buf, protocol=protocol).dump(sd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", bytes((i * 37) % 256 for i in range(s.numel * s.size)))
        z.writestr("archive/version", "3\n")


s0, s1, s2 = Storage("FloatStorage", "0", 12), Storage("HalfStorage", "1", 4), Storage("LongStorage", "2", 2)
sd = collections.OrderedDict()
sd["w"] = Tensor(s0, 0, (3, 4), (4, 1))
sd["wt"] = Tensor(s0, 0, (4, 3), (1, 4))
sd["row"] = Tensor(s0, 4, (4,), (1,))
sd["h"] = Tensor(s1, 0, (2, 2), (2, 1), param=True)
sd["ids"] = Tensor(s2, 0, (2,), (1,))
sd._metadata = collections.OrderedDict([("", {"version": 1})])
pth(f"{out}/small_p2.pth", sd, [s0, s1, s2])
pth(f"{out}/small_p4.pth", sd, [s0, s1, s2], protocol=4)


def st(path, tensors, meta=None):
    header, data = {}, b""
    if meta:
        header["__metadata__"] = meta
    for k, (dt, shape, size) in tensors.items():
        n = size
        for d in shape:
            n *= d
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((i * 31) % 256 for i in range(n))
    h = json.dumps(header).encode()
    h += b" " * (-(len(h) + 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)


st(f"{out}/small.safetensors", {"a": ("F32", [2, 3], 4), "b": ("F16", [4], 2), "c": ("BF16", [2], 2),
                                "d": ("U8", [3], 1), "e": ("I64", [1], 8), "z": ("F32", [0], 4)},
   {"format": "pt"})
