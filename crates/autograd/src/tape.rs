//! The tape: ops record themselves (only when an input needs a gradient), `backward` walks the
//! records in reverse, and each record — with the activations it saved — is dropped as soon as
//! its backward has run.

use crate::error::{AutogradError, Result};
use nibble_tensor::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The backward half of an op. One small struct per op holds what its backward needs; the
/// forward is the function that builds it. Other crates add ops by implementing this trait and
/// calling [`Tape::record`]. An op is `Send`, so that a tape (and the step recording on it)
/// can run on any thread, e.g. a worker of the rayon pool.
pub trait Op: Send {
    /// The op's name, for error messages.
    fn name(&self) -> &'static str;
    /// Given the gradient of the loss w.r.t. the op's output, returns the gradient w.r.t. each
    /// `Var` input, in the order they were passed to [`Tape::record`] (`None` where an input
    /// needs none). Gradients of parameters the op holds are accumulated into them directly.
    /// Consumes the op, so that saved activations are freed right after, and takes the output
    /// gradient by value, so that an op passing it on (add, ReLU, a residual base) reuses its
    /// buffer instead of copying it.
    fn backward(self: Box<Self>, d_out: Tensor) -> Result<Vec<Option<Tensor>>>;
    /// [`Op::backward`] given the gradients already accumulated for its inputs: `acc[i]` is
    /// input `i`'s gradient so far (from ops later in the forward), `None` where none has
    /// arrived yet (or the input repeats an earlier one, or is not tracked). An op may add its
    /// gradient for input `i` into `acc[i]` in place (e.g. a product accumulated by its GEMM,
    /// saving a gradient-sized buffer and a pass over it) and return `None` for it; whatever
    /// it returns is added by the tape as [`Op::backward`]'s results are. A gradient added in
    /// place must have `acc[i]`'s shape. The default runs [`Op::backward`].
    ///
    /// Every gradient an op gives (returned or left in `acc`) must have its input's shape;
    /// [`Tape::backward`] checks it and returns [`AutogradError::BadGradient`] naming the op.
    fn backward_accumulate(
        self: Box<Self>,
        d_out: Tensor,
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let _ = acc;
        self.backward(d_out)
    }
}

/// [`AutogradError::BadGradient`]: `op` gave a gradient (`how`: "" or "accumulated in place ")
/// of shape `found` for an input of shape `want`.
fn wrong_shape(op: &'static str, how: &str, found: &[usize], want: &[usize]) -> AutogradError {
    AutogradError::BadGradient {
        op,
        what: format!("a gradient {how}of shape {found:?} for an input of shape {want:?}"),
    }
}

/// A number no tape has used: each tape and each use of it (after `backward` or `clear`) gets
/// its own, so that a [`Var`] of one tape (or of an earlier use) is never mistaken for a record
/// of another (e.g. of the inner tape a checkpointed segment recomputes on).
fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Identifies a record on a tape, in one use of the tape (`generation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct NodeId {
    generation: u64,
    index: usize,
}

/// A value in a computation: a shared tensor and, if it needs a gradient, the record that made it.
#[derive(Debug, Clone)]
pub struct Var {
    value: Arc<Tensor>,
    node: Option<NodeId>,
}

impl Var {
    /// A value that needs no gradient (an input, a frozen constant). Nothing is recorded.
    pub fn constant(value: Tensor) -> Self {
        Var {
            value: Arc::new(value),
            node: None,
        }
    }

    /// [`Var::constant`] for a value already behind an `Arc` (no copy).
    pub fn constant_shared(value: Arc<Tensor>) -> Self {
        Var { value, node: None }
    }

    /// The tensor.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// A shared handle to the tensor (cheap: ops save inputs this way, without copying).
    pub fn shared(&self) -> Arc<Tensor> {
        Arc::clone(&self.value)
    }

    /// The tensor, without copying when this `Var` holds the only reference to it (else a copy).
    pub fn into_tensor(self) -> Tensor {
        Arc::try_unwrap(self.value).unwrap_or_else(|shared| (*shared).clone())
    }

    /// A handle with the same record but no reference to the value: lets an op consume a
    /// `Var`'s buffer while still naming it as an input.
    pub(crate) fn clone_handle(&self) -> Var {
        Var {
            value: Arc::new(Tensor::zeros(&[0])),
            node: self.node,
        }
    }

    /// Whether a gradient flows back through this value.
    pub fn is_tracked(&self) -> bool {
        self.node.is_some()
    }

    /// The shape of the value.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
}

/// The output of an op recorded without being computed ([`Tape::frozen_linear_pending`],
/// [`Tape::linear_pending`], [`Tape::linear_add_pending`], [`Tape::add_pending`]): its shape
/// and its record, no value. What a checkpointed segment's recomputation ends in when the
/// backward reads none of the last ops' outputs (see [`Tape::checkpoint_with`]): a linear
/// layer's backward reads its input, never its output, so the last products of a segment need
/// not be run again. There is no way to read the value, so none can be read by mistake.
#[derive(Debug)]
pub struct Pending {
    node: Option<NodeId>,
    shape: Vec<usize>,
}

impl Pending {
    /// The shape the output would have.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether a gradient flows back through this output.
    pub fn is_tracked(&self) -> bool {
        self.node.is_some()
    }
}

impl From<Var> for Pending {
    /// A computed output, as the end of a recomputation (its value is dropped).
    fn from(v: Var) -> Self {
        Pending {
            shape: v.shape().to_vec(),
            node: v.node,
        }
    }
}

/// One node of the tape: what it is, and the shape of its value (every gradient that reaches
/// it must have that shape).
struct Record {
    kind: RecordKind,
    shape: Vec<usize>,
}

enum RecordKind {
    /// A leaf that wants its gradient reported (see [`Tape::leaf`]).
    Leaf,
    /// An op and the nodes of its `Var` inputs (None: untracked input).
    Op {
        op: Box<dyn Op>,
        inputs: Vec<Option<NodeId>>,
    },
}

/// Records ops for one forward pass; `backward` consumes the records. Reusable: after
/// `backward` (or [`Tape::clear`]) it is empty again and the next step records afresh.
/// `Send` and `Sync` (the records sit behind a mutex), so that a training step can run on a
/// worker of the rayon pool, where each parallel kernel starts without waking the pool from
/// outside; ops are still recorded in the order they are called.
///
/// ```
/// use nibble_autograd::{Param, Tape, Var};
/// use nibble_tensor::Tensor;
/// let tape = Tape::new();
/// let w = Param::new("w", Tensor::from_vec(&[1, 2], vec![2.0, -1.0]).unwrap(), true);
/// let x = Var::constant(Tensor::from_vec(&[1, 2], vec![3.0, 4.0]).unwrap());
/// let y = tape.linear(&x, &w, None).unwrap(); // 2*3 - 4 = 2
/// let loss = tape.sum(&y).unwrap();
/// tape.backward(&loss).unwrap();
/// assert_eq!(w.grad().as_ref().unwrap().data(), &[3.0, 4.0]);
/// assert_eq!(tape.len(), 0);
/// ```
pub struct Tape {
    records: Mutex<Vec<Record>>,
    generation: AtomicU64,
    enabled: AtomicBool,
    /// Time per op name while profiling ([`Tape::set_profiling`]).
    profile: Mutex<Option<Profile>>,
}

/// What a profiling tape has timed so far.
#[derive(Debug, Clone)]
struct Profile {
    forward: Vec<OpTime>,
    backward: Vec<OpTime>,
    /// When the last record was made (or profiling started, or a backward ended).
    mark: std::time::Instant,
}

impl Profile {
    fn new() -> Self {
        Profile {
            forward: Vec::new(),
            backward: Vec::new(),
            mark: std::time::Instant::now(),
        }
    }
}

/// Adds one call of `seconds` to `name`'s entry of `times`.
fn add_time(times: &mut Vec<OpTime>, name: &'static str, seconds: f64) {
    match times.iter_mut().find(|t| t.name == name) {
        Some(t) => {
            t.calls += 1;
            t.seconds += seconds;
        }
        None => times.push(OpTime {
            name,
            calls: 1,
            seconds,
        }),
    }
}

/// `times` with the costliest first.
fn costliest_first(mut times: Vec<OpTime>) -> Vec<OpTime> {
    times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    times
}

/// Time spent in one kind of op ([`Tape::backward_profile`], [`Tape::forward_profile`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// The op's name ([`Op::name`]).
    pub name: &'static str,
    /// Calls of ops of this name (backward calls, or records made in forwards).
    pub calls: usize,
    /// Seconds spent in them: in their backward (inclusive: an op whose backward runs a
    /// nested backward, a checkpointed segment's, also counts the nested ops' time), or in a
    /// forward from the record before to theirs (see [`Tape::forward_profile`]).
    pub seconds: f64,
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tape({} records)", self.len())
    }
}

/// Gradients of the leaves made with [`Tape::leaf`], returned by [`Tape::backward`].
#[derive(Debug, Default)]
pub struct Gradients {
    by_node: HashMap<NodeId, Tensor>,
}

impl Gradients {
    /// The gradient of the loss w.r.t. `leaf` (None if no gradient reached it).
    pub fn get(&self, leaf: &Var) -> Option<&Tensor> {
        leaf.node.and_then(|n| self.by_node.get(&n))
    }

    /// The gradient of the loss w.r.t. `leaf`, moved out (no copy).
    pub fn take(&mut self, leaf: &Var) -> Option<Tensor> {
        leaf.node.and_then(|n| self.by_node.remove(&n))
    }
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Tape {
            records: Mutex::new(Vec::new()),
            generation: AtomicU64::new(next_generation()),
            enabled: AtomicBool::new(true),
            profile: Mutex::new(None),
        }
    }

    /// Starts (`true`, from zero) or stops (`false`) timing each op by op name, for finding
    /// where a training step spends its time ([`Tape::backward_profile`],
    /// [`Tape::forward_profile`]). Off by default.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape, Var};
    /// use nibble_tensor::Tensor;
    /// let tape = Tape::new();
    /// tape.set_profiling(true);
    /// let w = Param::new("w", Tensor::from_vec(&[1, 2], vec![2.0, -1.0]).unwrap(), true);
    /// let x = Var::constant(Tensor::from_vec(&[1, 2], vec![3.0, 4.0]).unwrap());
    /// let y = tape.linear(&x, &w, None).unwrap();
    /// let loss = tape.sum(&y).unwrap();
    /// // Forward records go by the name they were recorded under, backwards by `Op::name`.
    /// let forward: Vec<_> = tape.forward_profile().iter().map(|t| (t.name, t.calls)).collect();
    /// assert!(forward.contains(&("linear", 1)) && forward.contains(&("sum", 1)));
    /// tape.backward(&loss).unwrap();
    /// let names: Vec<_> = tape.backward_profile().iter().map(|t| (t.name, t.calls)).collect();
    /// assert!(names.contains(&("linear", 1)) && names.contains(&("sum/mean", 1)));
    /// ```
    pub fn set_profiling(&self, on: bool) {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = on.then(Profile::new);
    }

    /// The backward time per op name since [`Tape::set_profiling`]`(true)`, the costliest
    /// first (empty when not profiling).
    pub fn backward_profile(&self) -> Vec<OpTime> {
        let guard = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        costliest_first(
            guard
                .as_ref()
                .map(|p| p.backward.clone())
                .unwrap_or_default(),
        )
    }

    /// The forward time per op name since [`Tape::set_profiling`]`(true)`, the costliest
    /// first (empty when not profiling): each record made (recorded or not, see
    /// [`Tape::record`]) counts the time since the record before it, or since profiling
    /// started, the last backward ended or the tape was cleared. An op computes its output before it records it, so
    /// this is the op's own time plus whatever ran between it and the op before (a closure's
    /// glue; work outside the tape, such as an optimizer step between a backward and the next
    /// forward, lands on the first op after it).
    pub fn forward_profile(&self) -> Vec<OpTime> {
        let guard = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        costliest_first(
            guard
                .as_ref()
                .map(|p| p.forward.clone())
                .unwrap_or_default(),
        )
    }

    /// Adds `seconds` of `name`'s backward to the profile, if profiling.
    fn add_profile(&self, name: &'static str, seconds: f64) {
        let mut guard = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            add_time(&mut p.backward, name, seconds);
        }
    }

    /// Counts a forward record of `name` in the profile, if profiling (see
    /// [`Tape::forward_profile`]).
    fn mark_forward(&self, name: &'static str) {
        let mut guard = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            let now = std::time::Instant::now();
            add_time(&mut p.forward, name, (now - p.mark).as_secs_f64());
            p.mark = now;
        }
    }

    /// Restarts the forward clock (at the end of a backward, on a clear), if profiling.
    fn restart_forward_clock(&self) {
        let mut guard = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            p.mark = std::time::Instant::now();
        }
    }

    /// Whether [`Tape::set_profiling`] is on.
    fn profiling(&self) -> bool {
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The records (a panic while they were held leaves them as they were: usable).
    fn records(&self) -> MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn new_generation(&self) {
        self.generation.store(next_generation(), Ordering::Relaxed);
    }

    /// Number of records held (0 after backward, and 0 for a forward with no tracked input).
    pub fn len(&self) -> usize {
        self.records().len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` with recording switched off (inference): ops compute but record nothing, even
    /// when parameters require gradients.
    pub fn no_grad<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.enabled.swap(false, Ordering::Relaxed);
        let out = f();
        self.enabled.store(was, Ordering::Relaxed);
        out
    }

    /// Whether recording is on (see [`Tape::no_grad`]).
    pub fn is_recording(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Drops every record (and the activations they saved) without running backward.
    pub fn clear(&self) {
        self.records().clear();
        self.new_generation();
        self.restart_forward_clock();
    }

    /// A leaf value whose gradient [`Tape::backward`] reports in its [`Gradients`].
    pub fn leaf(&self, value: Tensor) -> Var {
        self.leaf_shared(Arc::new(value))
    }

    /// [`Tape::leaf`] for a value already behind an `Arc` (no copy: e.g. a checkpointed
    /// segment's saved input becoming the leaf of its recomputation).
    pub fn leaf_shared(&self, value: Arc<Tensor>) -> Var {
        if !self.is_recording() {
            return Var { value, node: None };
        }
        let node = self.push(RecordKind::Leaf, value.shape().to_vec());
        Var {
            value,
            node: Some(node),
        }
    }

    fn push(&self, kind: RecordKind, shape: Vec<usize>) -> NodeId {
        let mut records = self.records();
        records.push(Record { kind, shape });
        NodeId {
            generation: self.generation(),
            index: records.len() - 1,
        }
    }

    fn check(&self, op: &'static str, v: &Var) -> Result<Option<NodeId>> {
        self.check_node(op, v.node)
    }

    fn check_node(&self, op: &'static str, node: Option<NodeId>) -> Result<Option<NodeId>> {
        match node {
            Some(n) if n.generation != self.generation() => Err(AutogradError::StaleVar { op }),
            other => Ok(other),
        }
    }

    /// Whether an op with these inputs (and, with `holds_trainable`, a parameter that needs a
    /// gradient) would be recorded.
    pub fn would_record(&self, inputs: &[&Var], holds_trainable: bool) -> bool {
        self.is_recording() && (holds_trainable || inputs.iter().any(|v| v.is_tracked()))
    }

    /// Records the op made by `make_op` without an output value (see [`Pending`]): its inputs
    /// are `base` (if given) and then `inputs`, and it is recorded only if one of them is
    /// tracked or the op holds a trainable parameter (`holds_trainable`).
    pub(crate) fn record_pending(
        &self,
        name: &'static str,
        base: Option<Pending>,
        inputs: &[&Var],
        shape: Vec<usize>,
        holds_trainable: bool,
        make_op: impl FnOnce() -> Box<dyn Op>,
    ) -> Result<Pending> {
        self.mark_forward(name);
        let mut nodes = Vec::with_capacity(inputs.len() + 1);
        if let Some(base) = &base {
            nodes.push(self.check_node(name, base.node)?);
        }
        for v in inputs {
            nodes.push(self.check(name, v)?);
        }
        let tracked = nodes.iter().any(Option::is_some);
        if !(self.is_recording() && (holds_trainable || tracked)) {
            return Ok(Pending { node: None, shape });
        }
        let node = self.push(
            RecordKind::Op {
                op: make_op(),
                inputs: nodes,
            },
            shape.clone(),
        );
        Ok(Pending {
            node: Some(node),
            shape,
        })
    }

    /// Wraps `output` in a [`Var`], recording the op made by `make_op` only if an input is
    /// tracked or the op holds a trainable parameter (`holds_trainable`). When nothing is
    /// recorded `make_op` is never called, so nothing is saved.
    pub fn record(
        &self,
        name: &'static str,
        inputs: &[&Var],
        output: Tensor,
        holds_trainable: bool,
        make_op: impl FnOnce() -> Box<dyn Op>,
    ) -> Result<Var> {
        self.record_shared(name, inputs, Arc::new(output), holds_trainable, make_op)
    }

    /// [`Tape::record`] for an output already behind an `Arc` (so the op can save the very
    /// buffer the returned `Var` holds).
    pub fn record_shared(
        &self,
        name: &'static str,
        inputs: &[&Var],
        output: Arc<Tensor>,
        holds_trainable: bool,
        make_op: impl FnOnce() -> Box<dyn Op>,
    ) -> Result<Var> {
        self.mark_forward(name);
        let nodes = inputs
            .iter()
            .map(|v| self.check(name, v))
            .collect::<Result<Vec<_>>>()?;
        if !self.would_record(inputs, holds_trainable) {
            return Ok(Var {
                value: output,
                node: None,
            });
        }
        let node = self.push(
            RecordKind::Op {
                op: make_op(),
                inputs: nodes,
            },
            output.shape().to_vec(),
        );
        Ok(Var {
            value: output,
            node: Some(node),
        })
    }

    /// Back-propagates from the one-element `loss`: accumulates parameter gradients, returns
    /// the gradients of [`Tape::leaf`] values, and empties the tape (freeing each record's saved
    /// activations as soon as its backward has run).
    pub fn backward(&self, loss: &Var) -> Result<Gradients> {
        if loss.value.numel() != 1 {
            return Err(AutogradError::NonScalarLoss {
                shape: loss.shape().to_vec(),
            });
        }
        let start = self.check("backward", loss)?;
        self.run_backward(start, Tensor::full(loss.shape(), 1.0))
    }

    /// Back-propagates the gradient `d_output` (same shape as `output`) of some scalar w.r.t.
    /// `output`, as [`Tape::backward`] does from a loss; takes `output` by value so that its
    /// buffer is freed before the backward runs (a checkpointed segment's recomputation uses
    /// this).
    pub fn backward_from(&self, output: Var, d_output: Tensor) -> Result<Gradients> {
        if d_output.shape() != output.shape() {
            return Err(AutogradError::BadGradient {
                op: "backward_from",
                what: format!(
                    "a gradient of shape {:?} for an output of shape {:?}",
                    d_output.shape(),
                    output.shape()
                ),
            });
        }
        let start = self.check("backward_from", &output)?;
        drop(output);
        self.run_backward(start, d_output)
    }

    /// [`Tape::backward_from`] for an output recorded without a value (see [`Pending`]).
    pub fn backward_from_pending(&self, output: Pending, d_output: Tensor) -> Result<Gradients> {
        if d_output.shape() != output.shape() {
            return Err(AutogradError::BadGradient {
                op: "backward_from_pending",
                what: format!(
                    "a gradient of shape {:?} for an output of shape {:?}",
                    d_output.shape(),
                    output.shape()
                ),
            });
        }
        let start = self.check_node("backward_from_pending", output.node)?;
        self.run_backward(start, d_output)
    }

    fn run_backward(&self, start: Option<NodeId>, seed: Tensor) -> Result<Gradients> {
        let out = self.run_backward_records(start, seed);
        self.restart_forward_clock();
        out
    }

    fn run_backward_records(&self, start: Option<NodeId>, seed: Tensor) -> Result<Gradients> {
        let mut records = std::mem::take(&mut *self.records());
        let generation = self.generation();
        self.new_generation();
        let mut out = Gradients::default();
        let Some(start) = start else {
            return Ok(out); // nothing tracked: nothing to do
        };
        let mut grads: Vec<Option<Tensor>> = (0..records.len()).map(|_| None).collect();
        grads[start.index] = Some(seed);
        records.truncate(start.index + 1);
        while let Some(record) = records.pop() {
            let index = records.len();
            let Some(d_out) = grads[index].take() else {
                continue; // no gradient reached this record; dropping it frees what it saved
            };
            match record.kind {
                RecordKind::Leaf => {
                    out.by_node.insert(NodeId { generation, index }, d_out);
                }
                RecordKind::Op { op, inputs } => {
                    let name = op.name();
                    let started = self.profiling().then(std::time::Instant::now);
                    // The gradients accumulated so far for the op's inputs, lent to it (the
                    // first occurrence of a node only), then put back.
                    let mut acc: Vec<Option<Tensor>> = inputs
                        .iter()
                        .enumerate()
                        .map(|(k, node)| match node {
                            Some(n) if !inputs[..k].contains(node) => grads[n.index].take(),
                            _ => None,
                        })
                        .collect();
                    let d_inputs = op.backward_accumulate(d_out, &mut acc);
                    let mut reshaped = None;
                    for (node, a) in inputs.iter().zip(acc) {
                        if let (Some(n), Some(a)) = (node, a) {
                            if a.shape() != records[n.index].shape.as_slice() {
                                reshaped = Some((a.shape().to_vec(), n.index));
                            }
                            grads[n.index] = Some(a);
                        }
                    }
                    let d_inputs = d_inputs?;
                    if let Some((found, index)) = reshaped {
                        let want = &records[index].shape;
                        return Err(wrong_shape(name, "accumulated in place ", &found, want));
                    }
                    if let Some(t) = started {
                        self.add_profile(name, t.elapsed().as_secs_f64());
                    }
                    if d_inputs.len() != inputs.len() {
                        return Err(AutogradError::BadGradient {
                            op: name,
                            what: format!(
                                "{} gradients for {} inputs",
                                d_inputs.len(),
                                inputs.len()
                            ),
                        });
                    }
                    for (node, g) in inputs.into_iter().zip(d_inputs) {
                        let (Some(node), Some(g)) = (node, g) else {
                            continue;
                        };
                        // An input precedes its op, so its record is still held. A gradient
                        // of another shape (an op of one's own, see [`Op`]) is an error here,
                        // before any backward receives it (the first to arrive was kept as it
                        // came, and a leaf reported a gradient of another shape).
                        let want = &records[node.index].shape;
                        if g.shape() != want.as_slice() {
                            return Err(wrong_shape(name, "", g.shape(), want));
                        }
                        match &mut grads[node.index] {
                            Some(acc) => acc
                                .add_assign(&g)
                                .map_err(|_| wrong_shape(name, "", g.shape(), acc.shape()))?,
                            slot @ None => *slot = Some(g),
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}
