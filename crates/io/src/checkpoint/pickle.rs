//! A small pickle virtual machine for the subset of pickle that `torch.save(state_dict)` and
//! `torch.save(model)` emit (protocol 2, plus the cheap parts of protocol 4). It never executes
//! anything: an allow-list of constructors is interpreted, not called, and any other global is
//! taken as a class whose instances `NEWOBJ` makes and `BUILD` fills with their `__dict__`
//! (`nn.Module`s), or refused where the pickle would call it.
//!
//! Defences: every length is checked against the remaining input before allocating; the value
//! stack, the mark stack, the memo and the nesting depth of values are bounded; containers are
//! reference-counted and copied on write (no cycles, no exponential blow-up through the memo),
//! with a budget on the total number of elements copied.

use std::collections::HashMap;
use std::rc::Rc;

use super::DType;

/// Most values on the stack at once.
const MAX_STACK: usize = 1 << 20;
/// Most nested MARKs.
const MAX_MARKS: usize = 64;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 20;
/// Deepest nesting of containers (a state dict needs 4).
pub(crate) const MAX_DEPTH: usize = 64;
/// Longest GLOBAL module or name line.
const MAX_GLOBAL_LINE: usize = 256;
/// Most dimensions a tensor may have.
pub(crate) const MAX_DIMS: usize = 64;

/// A pickle error: byte offset of the opcode and what went wrong.
#[derive(Debug)]
pub(crate) struct PickleError {
    pub(crate) offset: usize,
    pub(crate) reason: String,
}

/// The allow-listed globals.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`: a parameter with attributes of its own.
    RebuildParameterWithState,
    /// `torch._tensor._rebuild_from_type_v2(func, new_type, args, state)`: a tensor of a
    /// subclass or with attributes of its own (an `nn.Buffer`, `t.note = "x"`): `func(*args)`,
    /// its type and attributes dropped.
    RebuildFromTypeV2,
    /// `builtins.set` (`__builtin__.set` in protocol 2): an `nn.Module`'s
    /// `_non_persistent_buffers_set`, read as the list of its items.
    Set,
    Storage(DType),
    /// A class of [`INERT_CLASSES`]: never called; an instance is an opaque
    /// [`Value::Object`].
    Inert(&'static str),
    /// Any other global (`module.Name`), taken as a class whose instances `torch.save(model)`
    /// pickles: `NEWOBJ` makes a [`Value::Module`] of it, and `REDUCE` an opaque
    /// [`Value::Call`] (nothing is ever called; where a state dict needs the result, that is
    /// an error naming it).
    Class(Rc<str>),
}

/// An instance that `NEWOBJ` made of a [`Global::Class`] (an `nn.Module` of a whole pickled
/// model), with the dict its `BUILD` gave it (`_parameters`, `_buffers`, `_modules`, ...).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ModuleObj {
    /// Which `NEWOBJ` made it (the memo's copies of the instance are updated by its `BUILD`).
    pub(crate) id: u32,
    /// `module.Name` of its class.
    pub(crate) class: Rc<str>,
    /// Its `__dict__`, once built.
    pub(crate) state: Option<Rc<Seq<(Value, Value)>>>,
}

/// Classes that training checkpoints pickle beside the state dict, for their hyperparameters
/// (Lightning's `hyper_parameters`, an `argparse.Namespace` of older code): an instance
/// becomes an opaque [`Value::Object`] whose contents are dropped, so that the state dict
/// beside it can be read. Nothing is ever called; every other class stays refused.
const INERT_CLASSES: [&str; 4] = [
    "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
];

/// Modules whose globals are refused outright (what a malicious pickle names to run code or
/// reach the system), though nibble never calls a global: the error comes at once, at the
/// GLOBAL.
const DENIED_MODULES: [&str; 34] = [
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pickle",
    "_pickle",
    "marshal",
    "code",
    "codeop",
    "pty",
    "ctypes",
    "webbrowser",
    "multiprocessing",
    "signal",
    "tempfile",
    "io",
    "pathlib",
    "glob",
    "http",
    "urllib",
    "asyncio",
    "threading",
    "_thread",
    "operator",
    "functools",
    "types",
    "inspect",
    "pdb",
    "platform",
];

/// The builtins a pickle may name: `set` and `frozenset` (a module's non-persistent buffers),
/// `getattr` (a bound method among its hooks, never called), and `complex` and `bytearray`
/// (values a training checkpoint keeps beside its state dict, which
/// `torch.load(weights_only=True)` reads; opaque here); every other builtin is refused.
const BUILTINS_READ: [&str; 5] = ["set", "frozenset", "getattr", "complex", "bytearray"];

/// A persistent storage reference: `('storage', StorageType, key, location, numel)`, or in the
/// legacy format the same with a sixth item, the view metadata, `None`.
#[derive(Debug, PartialEq)]
pub(crate) struct StorageRef {
    pub(crate) dtype: DType,
    pub(crate) key: String,
    pub(crate) numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it.
#[derive(Debug, PartialEq)]
pub(crate) struct TensorRef {
    pub(crate) storage: Rc<StorageRef>,
    pub(crate) offset: u64,
    pub(crate) size: Vec<u64>,
    pub(crate) stride: Vec<u64>,
    /// PyTorch's lazy negation bit (`metadata = {'neg': True}`: a `z.conj().imag` or a
    /// `_neg_view()` saved as it is): the tensor's values are its storage's negated.
    pub(crate) negated: bool,
}

/// A container value with its nesting depth (1 + the deepest child).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Seq<T> {
    pub(crate) depth: usize,
    pub(crate) items: Vec<T>,
}

/// A pickled value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An int beyond 64 bits (a 128-bit seed beside a state dict): opaque, an error wherever
    /// a tensor needs a number.
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Tuple(Rc<Seq<Value>>),
    List(Rc<Seq<Value>>),
    Dict(Rc<Seq<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// An instance of an [`INERT_CLASSES`] class, its contents dropped.
    Object(&'static str),
    /// An instance of another class (see [`ModuleObj`]).
    Module(Rc<ModuleObj>),
    /// What a `REDUCE` of a [`Global::Class`] stands for (`getattr(module, "_hook")` of a
    /// module's hooks, `torch.device("cpu")`): never called, opaque; an error wherever a
    /// state dict needs a value.
    Call(Rc<str>),
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(s) => s.depth,
            Value::Module(m) => m.state.as_ref().map_or(0, |s| s.depth + 1),
            _ => 0,
        }
    }

    /// A short description for messages.
    pub(crate) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt => "int beyond 64 bits".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => {
                let short: String = s.chars().take(40).collect();
                format!("str {short:?}")
            }
            Value::Tuple(s) => format!("tuple of {}", s.items.len()),
            Value::List(s) => format!("list of {}", s.items.len()),
            Value::Dict(s) => format!("dict of {}", s.items.len()),
            Value::Global(Global::Class(name)) => format!("global `{name}`"),
            Value::Global(g) => format!("global {g:?}"),
            Value::Storage(s) => format!("{} storage `{}`", s.dtype, s.key),
            Value::Tensor(_) => "tensor".into(),
            Value::Object(class) => format!("{class} object"),
            Value::Module(m) => format!("`{}` object", m.class),
            Value::Call(name) => format!(
                "call of global `{name}` (which nibble never makes: the call is not allowed)"
            ),
        }
    }
}

/// The address of a dict's or list's shared items (what copy-on-write keeps while nothing else
/// holds them), for [`Vm::container_memos`]; `None` for other values.
fn container_address(v: &Value) -> Option<usize> {
    match v {
        Value::Dict(d) => Some(Rc::as_ptr(d) as *const u8 as usize),
        Value::List(l) => Some(Rc::as_ptr(l) as *const u8 as usize),
        _ => None,
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        _ => "unknown opcode",
    }
}

struct Vm<'a> {
    code: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed.
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements that copy-on-write may still copy.
    copy_budget: usize,
    /// [`Value::Module`]s made so far (the next one's id).
    modules: u32,
    /// The memo indices holding each [`Value::Module`] (by id), so that its `BUILD` updates
    /// them: `torch.save` memoizes an instance before building it.
    module_memos: HashMap<u32, Vec<u32>>,
    /// The memo indices holding each dict or list (by the address of its shared items), so
    /// that filling it (`SETITEMS`, `APPENDS`, `ADDITEMS`) fills them too: pickle memoizes a
    /// container when it is still empty, and a later reference to it (`BINGET`: a state dict
    /// saved under two names) read it empty. An index is only updated while it still holds
    /// that very container (an address may be reused).
    container_memos: HashMap<usize, Vec<u32>>,
}

type R<T> = std::result::Result<T, PickleError>;

impl<'a> Vm<'a> {
    fn err<T>(&self, reason: impl Into<String>) -> R<T> {
        Err(PickleError {
            offset: self.op_at,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let code: &'a [u8] = self.code;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| code.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => self.err(format!(
                "needs {n} bytes of argument, {} left (truncated?)",
                code.len().saturating_sub(self.pos)
            )),
        }
    }

    fn take_arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return self.err(format!("stack exceeds {MAX_STACK} values"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top_mut(&mut self) -> R<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        let at = self.op_at;
        self.stack.last_mut().ok_or(PickleError {
            offset: at,
            reason: "stack underflow".into(),
        })
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return self.err("no MARK to pop to");
        };
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn depth_ok(&self, depth: usize) -> R<usize> {
        if depth > MAX_DEPTH {
            return self.err(format!("values nested deeper than {MAX_DEPTH}"));
        }
        Ok(depth)
    }

    fn tuple(&self, items: Vec<Value>) -> R<Value> {
        let depth = self.depth_ok(1 + items.iter().map(Value::depth).max().unwrap_or(0))?;
        Ok(Value::Tuple(Rc::new(Seq { depth, items })))
    }

    fn string(&self, bytes: &[u8]) -> R<Value> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    /// Charges `n` copied elements to the copy-on-write budget.
    fn charge(&mut self, n: usize) -> R<()> {
        match self.copy_budget.checked_sub(n) {
            Some(left) => {
                self.copy_budget = left;
                Ok(())
            }
            None => self.err("too much copying of shared containers (memo abuse?)"),
        }
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let v = match self.stack.last() {
            Some(v) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => v.clone(),
            _ => return self.err("memo put with an empty stack"),
        };
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return self.err(format!("memo exceeds {MAX_MEMO} entries"));
        }
        if let Value::Module(m) = &v {
            let slots = self.module_memos.entry(m.id).or_default();
            if slots.len() < MAX_MEMO {
                slots.push(idx);
            }
        }
        if let Some(at) = container_address(&v) {
            let slots = self.container_memos.entry(at).or_default();
            if slots.len() < MAX_MEMO {
                slots.push(idx);
            }
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    /// Takes out of the memo the entries that hold the container on top of the stack (so that
    /// filling it does not copy it for them), for [`Vm::restore_memos`] to put back filled.
    fn lend_memos(&mut self) -> Vec<u32> {
        let Some(top) = self.stack.last() else {
            return Vec::new();
        };
        let Some(at) = container_address(top) else {
            return Vec::new();
        };
        let Some(slots) = self.container_memos.get(&at) else {
            return Vec::new();
        };
        let held: Vec<u32> = slots
            .iter()
            .copied()
            .filter(|i| {
                self.memo
                    .get(i)
                    .is_some_and(|v| container_address(v) == Some(at))
            })
            .collect();
        for i in &held {
            self.memo.remove(i);
        }
        held
    }

    /// Puts the container on top of the stack, filled, back into the memo entries
    /// [`Vm::lend_memos`] took out.
    fn restore_memos(&mut self, held: Vec<u32>) {
        let Some(top) = self.stack.last().cloned() else {
            return;
        };
        let Some(at) = container_address(&top) else {
            return;
        };
        for i in &held {
            self.memo.insert(*i, top.clone());
        }
        if !held.is_empty() {
            let slots = self.container_memos.entry(at).or_default();
            for i in held {
                if !slots.contains(&i) && slots.len() < MAX_MEMO {
                    slots.push(i);
                }
            }
        }
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx).cloned() {
            Some(v) => self.push(v),
            None => self.err(format!("memo index {idx} was never stored")),
        }
    }

    /// Appends `items` to the list on top of the stack (and to the memo entries holding it).
    fn extend_list(&mut self, items: Vec<Value>) -> R<()> {
        let held = self.lend_memos();
        let done = self.extend_list_here(items);
        self.restore_memos(held);
        done
    }

    fn extend_list_here(&mut self, items: Vec<Value>) -> R<()> {
        let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        self.depth_ok(depth)?;
        let Value::List(list) = self.top_mut()? else {
            let kind = self.stack.last().map(Value::kind).unwrap_or_default();
            return self.err(format!("APPEND(S) to a {kind}, not a list"));
        };
        let copy = if Rc::strong_count(list) > 1 {
            list.items.len()
        } else {
            0
        };
        self.charge(copy)?;
        let Some(Value::List(list)) = self.stack.last_mut() else {
            return self.err("stack underflow");
        };
        let l = Rc::make_mut(list);
        l.depth = l.depth.max(depth);
        l.items.extend(items);
        Ok(())
    }

    /// Adds `pairs` to the dict on top of the stack (and to the memo entries holding it; an
    /// inert object drops them).
    fn extend_dict(&mut self, pairs: Vec<(Value, Value)>) -> R<()> {
        if matches!(self.stack.last(), Some(Value::Object(_))) {
            return Ok(());
        }
        let held = self.lend_memos();
        let done = self.extend_dict_here(pairs);
        self.restore_memos(held);
        done
    }

    fn extend_dict_here(&mut self, pairs: Vec<(Value, Value)>) -> R<()> {
        let depth = pairs
            .iter()
            .map(|(k, v)| k.depth().max(v.depth()))
            .max()
            .unwrap_or(0)
            + 1;
        self.depth_ok(depth)?;
        let Value::Dict(dict) = self.top_mut()? else {
            let kind = self.stack.last().map(Value::kind).unwrap_or_default();
            return self.err(format!("SETITEM(S) on a {kind}, not a dict"));
        };
        let copy = if Rc::strong_count(dict) > 1 {
            dict.items.len()
        } else {
            0
        };
        self.charge(copy)?;
        let Some(Value::Dict(dict)) = self.stack.last_mut() else {
            return self.err("stack underflow");
        };
        let d = Rc::make_mut(dict);
        d.depth = d.depth.max(depth);
        d.items.extend(pairs);
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> R<Value> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("builtins" | "__builtin__", "set") => Global::Set,
            ("torch", storage) => match storage {
                "FloatStorage" => Global::Storage(DType::F32),
                "HalfStorage" => Global::Storage(DType::F16),
                "BFloat16Storage" => Global::Storage(DType::BF16),
                "DoubleStorage" => Global::Storage(DType::F64),
                "LongStorage" => Global::Storage(DType::I64),
                "IntStorage" => Global::Storage(DType::I32),
                "ShortStorage" => Global::Storage(DType::I16),
                "CharStorage" => Global::Storage(DType::I8),
                "ByteStorage" => Global::Storage(DType::U8),
                "BoolStorage" => Global::Storage(DType::Bool),
                other if other.ends_with("Storage") => {
                    let other: String = other.chars().take(64).collect();
                    return self.err(format!(
                        "global `torch.{other}`: tensors of this storage type (complex, \
                         quantized or another dtype nibble does not read) are not supported; \
                         save them as float32 (`.float()`) or an integer type nibble reads"
                    ));
                }
                // A dtype or another torch global a module keeps as an attribute
                // (`torch.float16`): opaque, never called.
                other => Global::Class(Rc::from(format!(
                    "torch.{}",
                    other.chars().take(64).collect::<String>()
                ))),
            },
            ("torch._utils", "_rebuild_tensor_v3") => {
                return self.err(
                    "global `torch._utils._rebuild_tensor_v3`: PyTorch saves tensors of the \
                     newer dtypes this way (float8, uint16, uint32, uint64, ...), which nibble \
                     does not read from .pth files; save them as float32 (`.float()`) or int64 \
                     (`.long()`), or as safetensors, whose U16, U32 and U64 nibble reads as features and labels",
                )
            }
            _ => match INERT_CLASSES
                .iter()
                .find(|c| c.strip_suffix(name).and_then(|m| m.strip_suffix('.')) == Some(module))
            {
                Some(class) => Global::Inert(class),
                None => {
                    let m: String = module.chars().take(64).collect();
                    let n: String = name.chars().take(64).collect();
                    let root = module.split('.').next().unwrap_or(module);
                    let builtin = matches!(module, "builtins" | "__builtin__");
                    if DENIED_MODULES.contains(&root) || (builtin && !BUILTINS_READ.contains(&name))
                    {
                        return self.err(format!("global `{m}.{n}` is not allowed"));
                    }
                    Global::Class(Rc::from(format!("{m}.{n}")))
                }
            },
        };
        Ok(Value::Global(g))
    }

    fn line(&mut self) -> R<&'a str> {
        let code: &'a [u8] = self.code;
        let rest = code.get(self.pos..).unwrap_or(&[]);
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE + 1)];
        let Some(nl) = window.iter().position(|&b| b == b'\n') else {
            return self.err(format!(
                "GLOBAL line without a newline within {MAX_GLOBAL_LINE} bytes"
            ));
        };
        self.pos += nl + 1;
        match std::str::from_utf8(&window[..nl]) {
            Ok(s) => Ok(s),
            Err(_) => self.err("GLOBAL line is not UTF-8"),
        }
    }

    fn int_arg(&self, v: &Value, what: &str) -> R<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => self.err(format!(
                "{what} must be a non-negative int, found {}",
                other.kind()
            )),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> R<Vec<u64>> {
        let Value::Tuple(t) = v else {
            return self.err(format!("{what} must be a tuple, found {}", v.kind()));
        };
        if t.items.len() > MAX_DIMS {
            return self.err(format!("{what} has more than {MAX_DIMS} dimensions"));
        }
        t.items.iter().map(|x| self.int_arg(x, what)).collect()
    }

    /// An error at the current opcode (see [`Vm::err`]).
    fn error(&self, reason: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.op_at,
            reason: reason.into(),
        }
    }

    /// `BUILD` of the [`Value::Module`] on top of the stack with `state`: its `__dict__` (a
    /// dict, or the dict of a `(dict, slots)` pair). The instance is replaced, on the stack
    /// and in every memo entry holding it, by one with that state (copy on write: no value
    /// ever holds itself).
    fn build_module(&mut self, state: Value) -> R<()> {
        let dict = match state {
            Value::Dict(d) => d,
            Value::Tuple(t) => match t.items.first() {
                Some(Value::Dict(d)) => Rc::clone(d),
                _ => return self.err("BUILD of an object with a tuple state but no dict"),
            },
            other => {
                return self.err(format!(
                    "BUILD of an object with a {} state, not a dict",
                    other.kind()
                ))
            }
        };
        self.depth_ok(dict.depth + 1)?;
        let Some(Value::Module(m)) = self.stack.last() else {
            return self.err("stack underflow");
        };
        if m.state.is_some() {
            return self.err(format!("BUILD of a `{}` object built before", m.class));
        }
        let built = Value::Module(Rc::new(ModuleObj {
            id: m.id,
            class: Rc::clone(&m.class),
            state: Some(dict),
        }));
        if let Some(slots) = self.module_memos.get(&m.id) {
            for idx in slots {
                self.memo.insert(*idx, built.clone());
            }
        }
        if let Some(top) = self.stack.last_mut() {
            *top = built;
        }
        Ok(())
    }

    /// `_rebuild_tensor_v2`'s metadata (`torch._utils.get_tensor_metadata`): whether the
    /// tensor's negation bit is set (`'neg': True`). Any other setting (`'conj': True`, which a
    /// real tensor never has, or a key of a later PyTorch) is an error naming it, never
    /// dropped: each changes the tensor's values.
    fn tensor_metadata(&self, metadata: &Value) -> R<bool> {
        let items: &[(Value, Value)] = match metadata {
            Value::None => &[],
            Value::Dict(d) => &d.items,
            other => {
                return self.err(format!(
                    "_rebuild_tensor_v2's metadata must be a dict, found {}",
                    other.kind()
                ))
            }
        };
        let mut negated = false;
        for (k, v) in items {
            match (k, v) {
                (Value::Str(k), Value::Bool(b)) if &**k == "neg" => negated = *b,
                (Value::Str(k), Value::Bool(false)) if &**k == "conj" => {}
                (k, v) => {
                    return self.err(format!(
                        "tensor metadata {} = {} is a setting nibble does not read (it would \
                         change the tensor's values); save the tensor with `.clone()` or \
                         `.resolve_neg()` / `.resolve_conj()`",
                        k.kind(),
                        v.kind()
                    ))
                }
            }
        }
        Ok(negated)
    }

    fn reduce(&self, callable: Value, args: Value) -> R<Value> {
        let Value::Tuple(args) = args else {
            return self.err(format!(
                "REDUCE arguments must be a tuple, found {}",
                args.kind()
            ));
        };
        let args = &args.items;
        match callable {
            Value::Global(Global::OrderedDict) => {
                if !args.is_empty() {
                    return self.err("OrderedDict called with arguments");
                }
                Ok(Value::Dict(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))
            }
            Value::Global(Global::RebuildTensorV2) => {
                if args.len() != 6 && args.len() != 7 {
                    return self.err(format!(
                        "_rebuild_tensor_v2 takes 6 or 7 arguments, found {}",
                        args.len()
                    ));
                }
                let Value::Storage(storage) = &args[0] else {
                    return self.err(format!(
                        "_rebuild_tensor_v2 needs a storage, found {}",
                        args[0].kind()
                    ));
                };
                let offset = self.int_arg(&args[1], "storage_offset")?;
                let size = self.int_tuple(&args[2], "size")?;
                let stride = self.int_tuple(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return self.err(format!(
                        "size has {} dimensions, stride {}",
                        size.len(),
                        stride.len()
                    ));
                }
                if !matches!(args[4], Value::Bool(_)) {
                    return self.err(format!(
                        "requires_grad must be a bool, found {}",
                        args[4].kind()
                    ));
                }
                let negated = match args.get(6) {
                    Some(metadata) => self.tensor_metadata(metadata)?,
                    None => false,
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: Rc::clone(storage),
                    offset,
                    size,
                    stride,
                    negated,
                })))
            }
            Value::Global(Global::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                _ => self.err("_rebuild_parameter needs (tensor, requires_grad, hooks)"),
            },
            Value::Global(Global::RebuildParameterWithState) => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 4 => Ok(t.clone()),
                _ => self.err(
                    "_rebuild_parameter_with_state needs (tensor, requires_grad, hooks, state)",
                ),
            },
            Value::Global(Global::RebuildFromTypeV2) => match args.as_slice() {
                [func @ Value::Global(
                    Global::RebuildTensorV2
                    | Global::RebuildParameter
                    | Global::RebuildParameterWithState,
                ), _new_type, inner @ Value::Tuple(_), _state] => {
                    self.reduce(func.clone(), inner.clone())
                }
                _ => self.err(
                    "_rebuild_from_type_v2 needs (a tensor's rebuild function, type, its \
                     arguments, state)",
                ),
            },
            Value::Global(Global::Set) => match args.as_slice() {
                [] => Ok(Value::List(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                }))),
                [items @ (Value::List(_) | Value::Tuple(_))] => match items {
                    Value::Tuple(t) => Ok(Value::List(Rc::clone(t))),
                    other => Ok(other.clone()),
                },
                _ => self.err("set called with arguments other than one list"),
            },
            // Never called: where a state dict needs the result, that is an error then.
            Value::Global(Global::Class(name)) => Ok(Value::Call(name)),
            // Never called: the instance is opaque.
            Value::Global(Global::Inert(class)) => Ok(Value::Object(class)),
            other => self.err(format!("cannot call {}", other.kind())),
        }
    }

    fn persistent(&self, pid: Value) -> R<Value> {
        let Value::Tuple(t) = &pid else {
            return self.err(format!(
                "persistent id must be a tuple, found {}",
                pid.kind()
            ));
        };
        match t.items.as_slice() {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), numel]
            | [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), numel, Value::None]
                if &**tag == "storage" =>
            {
                let numel = self.int_arg(numel, "storage numel")?;
                Ok(Value::Storage(Rc::new(StorageRef {
                    dtype: *dtype,
                    key: key.to_string(),
                    numel,
                })))
            }
            [Value::Str(tag), Value::Global(Global::Storage(_)), Value::Str(_), Value::Str(_), _, view]
                if &**tag == "storage" =>
            {
                self.err(format!(
                    "a storage view ({} as view metadata: a pre-1.6 checkpoint of a tensor \
                     viewing part of another's storage) is not supported",
                    view.kind()
                ))
            }
            // The legacy format's module classes: `('module', cls, source_file, source)`
            // (the class, never called; its source is not read).
            [Value::Str(tag), cls @ Value::Global(Global::Class(_)), _, _]
                if &**tag == "module" =>
            {
                Ok(cls.clone())
            }
            _ => self.err("persistent id is not ('storage', <Storage type>, key, location, numel)"),
        }
    }

    fn run(&mut self) -> R<Value> {
        loop {
            self.op_at = self.pos;
            let [op] = match self.take_arr::<1>() {
                Ok(op) => op,
                Err(_) => return self.err("pickle ends without STOP (truncated?)"),
            };
            match op {
                0x80 => {
                    let [v] = self.take_arr::<1>()?;
                    if v > 5 {
                        return self.err(format!("unsupported pickle protocol {v}"));
                    }
                }
                0x95 => {
                    // FRAME: a length prefix only; frames are transparent here.
                    let n = u64::from_le_bytes(self.take_arr::<8>()?);
                    if n > (self.code.len() - self.pos) as u64 {
                        return self.err(format!("FRAME of {n} bytes runs past the end"));
                    }
                }
                b'}' => self.push(Value::Dict(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))?,
                b']' => self.push(Value::List(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))?,
                b')' => self.push(Value::Tuple(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))?,
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return self.err(format!("MARKs nested deeper than {MAX_MARKS}"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.take_arr::<4>()?) as usize;
                    let s = self.take(n)?;
                    let v = self.string(s)?;
                    self.push(v)?;
                }
                0x8c => {
                    let [n] = self.take_arr::<1>()?;
                    let s = self.take(n as usize)?;
                    let v = self.string(s)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take_arr::<8>()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.err(format!("string length {n} runs past the end"));
                    };
                    let s = self.take(n)?;
                    let v = self.string(s)?;
                    self.push(v)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take_arr::<4>()?);
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let [v] = self.take_arr::<1>()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_arr::<2>()?);
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    let [n] = self.take_arr::<1>()?;
                    let n = n as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        // (A long that needs them all: 2**63 takes 9 bytes, its sign byte 0.)
                        self.push(Value::BigInt)?;
                        continue;
                    }
                    let mut buf = [0u8; 8];
                    buf[..n].copy_from_slice(bytes);
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        buf[n..].fill(0xFF);
                    }
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_arr::<8>()?);
                    self.push(Value::Float(v))?;
                }
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'N' => self.push(Value::None)?,
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.push(v)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let v = self.global(module, name)?;
                    self.push(v)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    // NEWOBJ: `cls.__new__(cls, *args)`: an inert class's opaque instance, or
                    // any other class's instance to be built (never calling anything).
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match cls {
                        Value::Global(Global::Inert(class)) => Value::Object(class),
                        Value::Global(Global::Class(class)) => {
                            let id = self.modules;
                            self.modules = id
                                .checked_add(1)
                                .ok_or_else(|| self.error("too many objects"))?;
                            Value::Module(Rc::new(ModuleObj {
                                id,
                                class,
                                state: None,
                            }))
                        }
                        other => return self.err(format!("NEWOBJ of {}", other.kind())),
                    };
                    self.push(v)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let top = self.top_mut()?;
                    match top {
                        Value::Dict(_) | Value::Object(_) | Value::Call(_) => {}
                        Value::Module(_) => self.build_module(state)?,
                        other => {
                            let kind = other.kind();
                            return self
                                .err(format!("BUILD on a {kind}; only dicts are supported"));
                        }
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of values");
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.extend_dict(pairs)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                // Sets (protocol 4: a module's `_non_persistent_buffers_set`), read as lists
                // of their items, as `builtins.set(list)` is.
                0x8f => self.push(Value::List(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))?,
                0x90 => {
                    // ADDITEMS
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    let depth =
                        self.depth_ok(1 + items.iter().map(Value::depth).max().unwrap_or(0))?;
                    self.push(Value::List(Rc::new(Seq { depth, items })))?;
                }
                b'q' => {
                    let [i] = self.take_arr::<1>()?;
                    self.memo_put(i.into())?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.take_arr::<4>()?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let Ok(i) = u32::try_from(self.memo.len()) else {
                        return self.err("memo full");
                    };
                    self.memo_put(i)?;
                }
                b'h' => {
                    let [i] = self.take_arr::<1>()?;
                    self.memo_get(i.into())?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.take_arr::<4>()?);
                    self.memo_get(i)?;
                }
                b'.' => {
                    if !self.marks.is_empty() {
                        return self.err("STOP with an unclosed MARK");
                    }
                    return self.pop();
                }
                other => {
                    return self.err(format!(
                        "opcode {} (0x{other:02x}) is outside the supported subset",
                        op_name(other)
                    ))
                }
            }
        }
    }
}

/// Runs the pickle program `code` and returns the object it builds.
pub(crate) fn load(code: &[u8]) -> std::result::Result<Value, PickleError> {
    load_prefix(code).map(|(value, _)| value)
}

/// Runs the pickle program at the start of `code` (bytes after its STOP are left unread) and
/// returns the object it builds and the length of the program, STOP included.
pub(crate) fn load_prefix(code: &[u8]) -> std::result::Result<(Value, usize), PickleError> {
    if !code.is_empty() && code[0] != 0x80 {
        return Err(PickleError {
            offset: 0,
            reason: format!(
                "no PROTO opcode at its start (first byte 0x{:02x}): pickle protocol 0 or 1, which \
                 torch.load(weights_only=True) refuses as well; re-save with torch.save's \
                 default protocol",
                code[0]
            ),
        });
    }
    let mut vm = Vm {
        code,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copy_budget: code.len().saturating_mul(16).saturating_add(1 << 20),
        modules: 0,
        module_memos: HashMap::new(),
        container_memos: HashMap::new(),
    };
    let value = vm.run()?;
    Ok((value, vm.pos))
}
