"""nibble against PEFT on adapter configurations: targets (names, regexes, all-linear), lora_bias,
exclude_modules, modules_to_save, bias, rank/alpha patterns, rsLoRA, layers_to_transform,
absent settings, BatchNorm models, and nibble's own saved adapters loaded by PEFT.

Each case builds a small nn.Sequential, an adapter with PEFT (edited by hand where the case
needs it), and compares PEFT's logits with `nibble eval --logits` (max |diff| <= 1e-4), or
checks that both refuse it. Needs `pip install torch safetensors peft` and a built nibble.

Run: python tools/peft_cases.py [case-name-substring ...]
Env: PEFT_CASES_DIR (scratch folder, default /tmp/peftcheck), NIBBLE (the nibble binary,
default target/release/nibble of this checkout). Results in $PEFT_CASES_DIR/results.json.
"""
import copy, json, os, shutil, subprocess, sys, traceback, warnings, io, logging, contextlib
import torch
from torch import nn
from safetensors.torch import save_file, load_file
from peft import LoraConfig, get_peft_model, PeftModel

torch.set_num_threads(2)
ROOT = os.environ.get("PEFT_CASES_DIR", "/tmp/peftcheck")
NIB = os.environ.get(
    "NIBBLE",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "nibble"),
)
os.makedirs(ROOT, exist_ok=True)
TOL = 1e-4


def make_arch(kind):
    if kind == "ln":  # 0 Linear, 1 ReLU, 2 LayerNorm, 3 Linear, 4 GELU, 5 Linear
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    if kind == "bn":  # 0 Linear, 1 BatchNorm1d, 2 ReLU, 3 Linear, 4 GELU, 5 Linear
        return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    raise ValueError(kind)


ACT = {"ln": "relu,gelu", "bn": "relu,gelu"}


def setup():
    os.makedirs(ROOT, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for kind in ("ln", "bn"):
        torch.manual_seed(1 if kind == "ln" else 2)
        m = make_arch(kind)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(0.2 * torch.randn_like(p))  # non-default LayerNorm/BN affine too
            if kind == "bn":
                m[1].running_mean.copy_(0.3 * torch.randn(16))
                m[1].running_var.copy_(0.5 + torch.rand(16))
                m[1].num_batches_tracked.fill_(7)
        torch.save(m.state_dict(), f"{ROOT}/base_{kind}.pth")
    x = torch.randn(64, 12, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    save_file({"x_test": x, "y_test": y}, f"{ROOT}/data.safetensors")
    xt = torch.randn(256, 12, generator=g)
    yt = torch.randint(0, 4, (256,), generator=g)
    save_file({"x_train": xt, "y_train": yt, "x_test": x, "y_test": y}, f"{ROOT}/data_train.safetensors")


def fresh(kind):
    m = make_arch(kind)
    m.load_state_dict(torch.load(f"{ROOT}/base_{kind}.pth", weights_only=True))
    m.eval()
    return m


def x_test():
    return load_file(f"{ROOT}/data.safetensors")["x_test"]


def make_adapter(name, kind, cfg_kwargs, seed=0, cfg_edit=None, tensor_edit=None):
    """Creates an adapter with real PEFT, randomizes trainable state, saves, then optional hand edits."""
    d = f"{ROOT}/ad_{name}"
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(100 + seed)
    m = copy.deepcopy(fresh(kind))
    pm = get_peft_model(m, LoraConfig(**cfg_kwargs))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
            elif p.requires_grad:  # modules_to_save copies, biases for bias=all/lora_only
                p.add_(0.5 * torch.randn_like(p))
        for n, b in pm.named_buffers():
            if "modules_to_save" in n and b.dtype.is_floating_point:
                b.add_(0.2 * torch.rand_like(b))
    pm.save_pretrained(d)
    if tensor_edit:
        t = load_file(f"{d}/adapter_model.safetensors")
        t = tensor_edit(t)
        save_file(t, f"{d}/adapter_model.safetensors")
    if cfg_edit:
        c = json.load(open(f"{d}/adapter_config.json"))
        cfg_edit(c)
        json.dump(c, open(f"{d}/adapter_config.json", "w"), indent=2)
    return d


def make_adapter_bin():
    d = f"{ROOT}/ad_xbin"
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(100)
    pm = get_peft_model(copy.deepcopy(fresh("ln")), LoraConfig(r=4, lora_alpha=16, target_modules=["0", "3", "5"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(d, safe_serialization=False)
    return d


def peft_logits(kind, d):
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            pm = PeftModel.from_pretrained(fresh(kind), d)
            pm.eval()
            with torch.no_grad():
                out = pm(x_test())
            targets = pm.peft_config["default"].target_modules
            lora_mods = sorted({n.split(".lora_A")[0].replace("base_model.model.", "") for n, _ in pm.named_parameters() if "lora_A" in n})
            info = f"targets={targets} lora_on={lora_mods}"
            res = ("ok", out, info)
        except Exception as e:
            res = ("err", f"{type(e).__name__}: {e}", "")
    ws = [str(x.message)[:300] for x in w if "lora" in str(x.message).lower() or "key" in str(x.message).lower() or "target" in str(x.message).lower()]
    return res, ws


def nibble_logits(kind, d, extra_name):
    out = f"{ROOT}/nib_{extra_name}.safetensors"
    if os.path.exists(out):
        os.remove(out)
    cmd = [NIB, "eval", "--model", f"{ROOT}/base_{kind}.pth", "--data", f"{ROOT}/data.safetensors", "--format", "f32",
           "--activation", ACT[kind], "--logits", out]
    if d:
        cmd += ["--adapter", d]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": "2"})
    if p.returncode != 0:
        return ("err", (p.stderr.strip() or p.stdout.strip()).replace("\n", " | "), " ".join(cmd))
    return ("ok", load_file(out)["logits"], " ".join(cmd))


RESULTS = []


def compare(name, kind, d):
    (pr, pws) = peft_logits(kind, d)
    nr = nibble_logits(kind, d, name)
    with torch.no_grad():
        base = fresh(kind)(x_test())
    line = {"case": name, "kind": kind, "dir": d}
    if pr[0] == "ok" and nr[0] == "ok":
        diff = (pr[1] - nr[1]).abs().max().item()
        line.update(status="PASS" if diff <= TOL else "FAIL", maxdiff=diff,
                    moved=(pr[1] - base).abs().max().item(), peft_info=pr[2])
    elif pr[0] == "err" and nr[0] == "err":
        line.update(status="BOTH-ERR", peft_err=pr[1], nibble_err=nr[1])
    elif pr[0] == "err":
        line.update(status="MISMATCH(peft err, nibble ok)", peft_err=pr[1],
                    nibble_vs_base=(nr[1] - base).abs().max().item())
    else:
        line.update(status="MISMATCH(peft ok, nibble err)", nibble_err=nr[1], peft_info=pr[2],
                    moved=(pr[1] - base).abs().max().item())
    if pws:
        line["peft_warnings"] = pws
    line["nibble_cmd"] = nr[2]
    RESULTS.append(line)
    print(json.dumps({k: v for k, v in line.items() if k != "nibble_cmd"}, indent=1), flush=True)


def drop(*keys):
    def f(c):
        for k in keys:
            c.pop(k, None)
    return f


def setkv(**kv):
    def f(c):
        c.update(kv)
    return f


def cases():
    L = dict(r=4, lora_alpha=16, lora_dropout=0.0)
    C = []
    # 1
    C.append(("c1_plain_035", "ln", lambda: make_adapter("c1", "ln", dict(L, target_modules=["0", "3", "5"]))))
    C.append(("c1_plain_035_bn", "bn", lambda: make_adapter("c1bn", "bn", dict(L, target_modules=["0", "3", "5"]))))

    # 2: target ["3"] only, file also has "0" tensors from another adapter
    def c2():
        other = make_adapter("c2_other", "ln", dict(L, target_modules=["0", "3"]), seed=5)
        ot = load_file(f"{other}/adapter_model.safetensors")
        extra = {k: v for k, v in ot.items() if k.startswith("base_model.model.0.")}
        return make_adapter("c2", "ln", dict(L, target_modules=["3"]), tensor_edit=lambda t: {**t, **extra})
    C.append(("c2_target3_extra0", "ln", c2))
    # 3 regex strings
    C.append(("c3_regex_^(0|5)$", "ln", lambda: make_adapter("c3a", "ln", dict(L, target_modules="^(0|5)$"))))
    C.append(("c3_regex_.*[35]", "ln", lambda: make_adapter("c3b", "ln", dict(L, target_modules=".*[35]"))))
    # regex string whose file also holds "0" (selected out by the regex)
    def c3c():
        other = make_adapter("c3c_other", "ln", dict(L, target_modules=["0", "3", "5"]), seed=6)
        ot = load_file(f"{other}/adapter_model.safetensors")
        return make_adapter("c3c", "ln", dict(L, target_modules=["0", "3", "5"]), seed=6,
                            cfg_edit=setkv(target_modules=".*[35]"))
    C.append(("c3_regex_.*[35]_file_has_0", "ln", c3c))
    # 4 all-linear: as PEFT saves it (resolved list) and hand-edited back to the string
    C.append(("c4_all_linear_as_saved", "ln", lambda: make_adapter("c4a", "ln", dict(L, target_modules="all-linear"))))
    C.append(("c4_all_linear_string", "ln", lambda: make_adapter("c4b", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                 cfg_edit=setkv(target_modules="all-linear"))))
    # 5 exclude_modules
    C.append(("c5_exclude_3_created", "ln", lambda: make_adapter("c5a", "ln", dict(L, target_modules=["0", "3", "5"], exclude_modules=["3"]))))
    C.append(("c5_exclude_3_handedit_file_has_3", "ln", lambda: make_adapter("c5b", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                             cfg_edit=setkv(exclude_modules=["3"]))))
    C.append(("c5_exclude_regex_string", "ln", lambda: make_adapter("c5c", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                    cfg_edit=setkv(exclude_modules="^[05]$"))))
    # 6 missing lora_alpha / r
    C.append(("c6_no_lora_alpha", "ln", lambda: make_adapter("c6a", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=drop("lora_alpha"))))
    C.append(("c6_no_r_rank4_tensors", "ln", lambda: make_adapter("c6b", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=drop("r"))))
    C.append(("c6_no_r_rank8_tensors", "ln", lambda: make_adapter("c6c", "ln", dict(L, r=8, target_modules=["0", "3", "5"]), cfg_edit=drop("r"))))
    C.append(("c6_no_r_no_alpha_rank8", "ln", lambda: make_adapter("c6d", "ln", dict(L, r=8, target_modules=["0", "3", "5"]), cfg_edit=drop("r", "lora_alpha"))))
    C.append(("c6_no_use_rslora_key", "ln", lambda: make_adapter("c6e", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=drop("use_rslora"))))
    # 7 rslora + patterns
    C.append(("c7_rslora_patterns", "ln", lambda: make_adapter("c7", "ln", dict(L, target_modules=["0", "3", "5"], use_rslora=True,
                                                                             rank_pattern={"3": 2, "5": 3}, alpha_pattern={"0": 5, "5": 30}))))
    C.append(("c7_rslora_regex_patterns", "ln", lambda: make_adapter("c7b", "ln", dict(L, target_modules=["0", "3", "5"], use_rslora=True,
                                                                                  rank_pattern={"[35]": 2}, alpha_pattern={"[05]": 3}))))
    # 8 modules_to_save
    C.append(("c8_mts_layernorm2", "ln", lambda: make_adapter("c8a", "ln", dict(L, target_modules=["0", "3", "5"], modules_to_save=["2"]))))
    C.append(("c8_mts_3_also_target", "ln", lambda: make_adapter("c8b", "ln", dict(L, target_modules=["0", "3", "5"], modules_to_save=["3"]))))
    C.append(("c8_mts_batchnorm1", "bn", lambda: make_adapter("c8c", "bn", dict(L, target_modules=["0", "3", "5"], modules_to_save=["1"]))))
    # modules_to_save=["3"] hand-edited into a config whose file holds lora for 3 (created without mts)
    C.append(("c8_mts_3_handedit_file_has_lora3", "ln", lambda: make_adapter("c8d", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                             cfg_edit=setkv(modules_to_save=["3"]))))
    # 9 bias
    C.append(("c9_bias_all", "ln", lambda: make_adapter("c9a", "ln", dict(L, target_modules=["0", "3"], bias="all"))))
    C.append(("c9_bias_lora_only", "ln", lambda: make_adapter("c9b", "ln", dict(L, target_modules=["0", "3"], bias="lora_only"))))
    C.append(("c9_bias_all_bn", "bn", lambda: make_adapter("c9c", "bn", dict(L, target_modules=["0", "3"], bias="all"))))
    # 10 non-Linear target
    C.append(("c10_target_relu1", "ln", lambda: make_adapter("c10a", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=["1"]))))
    C.append(("c10_target_layernorm2", "ln", lambda: make_adapter("c10b", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=["2"]))))
    C.append(("c10_target_0_and_relu1", "ln", lambda: make_adapter("c10c", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=["0", "1"]))))
    C.append(("c10_target_nothing_9", "ln", lambda: make_adapter("c10d", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=["9"]))))
    C.append(("c10_target_0_and_nothing_9", "ln", lambda: make_adapter("c10e", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=["0", "9"]))))
    C.append(("c10_regex_all_dotstar", "ln", lambda: make_adapter("c10f", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(target_modules=".*"))))
    C.append(("c10_no_target_modules", "ln", lambda: make_adapter("c10g", "ln", dict(L, target_modules=["0"]), cfg_edit=drop("target_modules"))))
    C.append(("c10_target_null", "ln", lambda: make_adapter("c10h", "ln", dict(L, target_modules=["0"]), cfg_edit=setkv(target_modules=None))))
    # 11 layers_to_transform
    C.append(("c11_layers_to_transform_0", "ln", lambda: make_adapter("c11a", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(layers_to_transform=[0]))))
    C.append(("c11_layers_to_transform_empty", "ln", lambda: make_adapter("c11b", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(layers_to_transform=[]))))
    C.append(("c11_layers_to_transform_int", "ln", lambda: make_adapter("c11c", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(layers_to_transform=3))))
    # extras
    C.append(("x_mts_2_missing_tensors", "ln", lambda: make_adapter("x1", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                    cfg_edit=setkv(modules_to_save=["2"]))))
    C.append(("x_mts_3_weight_only", "ln", lambda: make_adapter("x2", "ln", dict(L, target_modules=["0", "5"], modules_to_save=["3"]),
                                                                tensor_edit=lambda t: {k: v for k, v in t.items() if k != "base_model.model.3.bias"})))
    C.append(("x_bias_all_missing_a_bias", "ln", lambda: make_adapter("x3", "ln", dict(L, target_modules=["0", "3"], bias="all"),
                                                                      tensor_edit=lambda t: {k: v for k, v in t.items() if k != "base_model.model.5.bias"})))
    C.append(("x_exclude_everything", "ln", lambda: make_adapter("x4", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                 cfg_edit=setkv(exclude_modules=["0", "3", "5"]))))
    C.append(("x_layers_pattern_only", "ln", lambda: make_adapter("x5", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                  cfg_edit=setkv(layers_pattern="layers"))))
    C.append(("x_dotted_target_model.3", "ln", lambda: make_adapter("x6", "ln", dict(L, target_modules=["0"]),
                                                                    cfg_edit=setkv(target_modules=["model.3"]))))
    C.append(("x_mts_5_last_and_target", "ln", lambda: make_adapter("x7", "ln", dict(L, target_modules="all-linear", modules_to_save=["5"]))))
    C.append(("x_use_dora", "ln", lambda: make_adapter("x8", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(use_dora=True))))
    C.append(("x_mts_regex_like", "ln", lambda: make_adapter("x9", "ln", dict(L, target_modules=["0", "3", "5"], modules_to_save=["[2]"]))))
    C.append(("x_target_str_plain_3", "ln", lambda: make_adapter("x10", "ln", dict(L, target_modules=["0", "3", "5"]), cfg_edit=setkv(target_modules="3"))))
    C.append(("x_bin_serialization", "ln", lambda: make_adapter_bin()))
    C.append(("x_mts_bn_bias_lora_only", "bn", lambda: make_adapter("x11", "bn", dict(L, target_modules=["0", "3"], bias="lora_only"))))
    C.append(("x_rank_pattern_nontarget", "ln", lambda: make_adapter("x12", "ln", dict(L, target_modules=["0", "5"], rank_pattern={"3": 2, "5": 2}))))
    C.append(("x_exclude_suffix_list_and_regex_target", "ln", lambda: make_adapter("x13", "ln", dict(L, target_modules=".*", exclude_modules=["1", "2", "4"]))))
    # DoRA (use_dora): magnitudes drawn at random with the other lora_ tensors
    C.append(("d1_dora", "ln", lambda: make_adapter("d1", "ln", dict(L, target_modules=["0", "3", "5"], use_dora=True))))
    C.append(("d2_dora_rslora_patterns_bias_all", "ln", lambda: make_adapter("d2", "ln", dict(L, target_modules=["0", "3", "5"], use_dora=True, use_rslora=True,
                                                                                           rank_pattern={"3": 2}, alpha_pattern={"0": 3}, bias="all"))))
    C.append(("d3_dora_bn_modules_to_save", "bn", lambda: make_adapter("d3", "bn", dict(L, target_modules=["0", "3"], use_dora=True, modules_to_save=["1"]))))
    C.append(("d4_dora_all_linear", "ln", lambda: make_adapter("d4", "ln", dict(L, target_modules="all-linear", use_dora=True))))
    # rank_pattern / alpha_pattern: PEFT takes the first key in the file's order that matches,
    # a whole name getting no precedence (nibble preferred it, and sorted the keys)
    C.append(("c13_alpha_exact_after_regex", "ln", lambda: make_adapter("c13a", "ln", dict(L, target_modules=["0", "3", "5"],
                                                                                          alpha_pattern={".*": 2, "3": 16}))))
    C.append(("c13_alpha_unsorted_handedit", "ln", lambda: make_adapter("c13b", "ln", dict(L, target_modules=["0", "3", "5"]),
                                                                          cfg_edit=setkv(alpha_pattern={"[35]": 4, "[0-9]": 32}))))
    # lora_bias: a bias on each lora_B, trained and scaled with the product
    C.append(("e1_lora_bias", "ln", lambda: make_adapter("e1", "ln", dict(L, target_modules=["0", "3", "5"], lora_bias=True))))
    C.append(("e2_lora_bias_bias_all_patterns", "ln", lambda: make_adapter("e2", "ln", dict(L, target_modules=["0", "5"], lora_bias=True, bias="all",
                                                                                         use_rslora=True, alpha_pattern={"5": 2}))))
    C.append(("e3_lora_bias_bn_modules_to_save", "bn", lambda: make_adapter("e3", "bn", dict(L, target_modules=["0", "3"], lora_bias=True, modules_to_save=["1", "5"]))))
    C.append(("e4_lora_bias_missing_a_bias", "ln", lambda: make_adapter("e4", "ln", dict(L, target_modules=["0", "3"], lora_bias=True),
                                                                          tensor_edit=lambda t: {k: v for k, v in t.items() if k != "base_model.model.3.lora_B.bias"})))
    C.append(("e5_lora_bias_with_dora", "ln", lambda: make_adapter("e5", "ln", dict(L, target_modules=["0", "3"], lora_bias=True),
                                                                     cfg_edit=setkv(use_dora=True))))
    return C


def case12(kind):
    d = f"{ROOT}/nib_ad_{kind}"
    shutil.rmtree(d, ignore_errors=True)
    cmd = [NIB, "finetune", "--model", f"{ROOT}/base_{kind}.pth", "--data", f"{ROOT}/data_train.safetensors", "--format", "f32",
           "--rank", "4", "--steps", "20", "--activation", ACT[kind], "--save-adapter", d]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": "2"})
    if p.returncode != 0:
        RESULTS.append({"case": f"c12_nibble_adapter_{kind}", "status": "FINETUNE-ERR", "err": p.stderr})
        print(p.stderr)
        return
    print(open(f"{d}/adapter_config.json").read())
    compare(f"c12_nibble_adapter_{kind}", kind, d)


if __name__ == "__main__":
    setup()
    sel = sys.argv[1:]
    for name, kind, mk in cases():
        if sel and not any(s in name for s in sel):
            continue
        try:
            d = mk()
        except Exception as e:
            RESULTS.append({"case": name, "status": "ADAPTER-CREATE-ERR", "err": f"{type(e).__name__}: {e}"})
            print(name, "create failed:", type(e).__name__, e, flush=True)
            continue
        compare(name, kind, d)
    if not sel or any("c12" in s for s in sel):
        case12("ln")
        case12("bn")
    json.dump(RESULTS, open(f"{ROOT}/results.json", "w"), indent=1, default=str)
    print("\nSUMMARY")
    for r in RESULTS:
        print(f"{r['case']:40s} {r['status']:32s} {r.get('maxdiff', '')}")
