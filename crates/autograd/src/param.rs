//! Parameters: named tensors shared between a model (which reads them in its forward) and an
//! optimizer (which updates them), with a gradient slot filled by `backward`.

use nibble_tensor::Tensor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Debug)]
struct ParamInner {
    name: String,
    value: RwLock<Tensor>,
    grad: RwLock<Option<Tensor>>,
    requires_grad: RwLock<bool>,
    /// Bumped by every [`Param::value_mut`]: see [`Param::version`].
    version: AtomicU64,
}

/// A named, shareable parameter tensor. Cloning a `Param` clones the handle, not the tensor.
///
/// ```
/// use nibble_autograd::Param;
/// use nibble_tensor::Tensor;
/// let p = Param::new("w", Tensor::zeros(&[2, 3]), true);
/// let q = p.clone();
/// q.value_mut().data_mut()[0] = 1.0;
/// assert_eq!(p.value().data()[0], 1.0);
/// assert!(p.grad().is_none());
/// ```
#[derive(Debug, Clone)]
pub struct Param(Arc<ParamInner>);

fn unpoison<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

impl Param {
    /// A parameter called `name` holding `value`.
    pub fn new(name: impl Into<String>, value: Tensor, requires_grad: bool) -> Self {
        Param(Arc::new(ParamInner {
            name: name.into(),
            value: RwLock::new(value),
            grad: RwLock::new(None),
            requires_grad: RwLock::new(requires_grad),
            version: AtomicU64::new(0),
        }))
    }

    /// The parameter's name (PyTorch's state-dict key, by convention).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Reads the value.
    pub fn value(&self) -> RwLockReadGuard<'_, Tensor> {
        unpoison(self.0.value.read())
    }

    /// Writes the value (and bumps [`Param::version`], whether or not the guard is written
    /// through).
    pub fn value_mut(&self) -> RwLockWriteGuard<'_, Tensor> {
        let guard = unpoison(self.0.value.write());
        self.0.version.fetch_add(1, Ordering::Release);
        guard
    }

    /// How many times [`Param::value_mut`] has been called: a value derived from the parameter
    /// and stored with the version it was derived at is current while the version is the same
    /// (what a cache of it checks; an optimizer's step changes it).
    ///
    /// ```
    /// use nibble_autograd::Param;
    /// use nibble_tensor::Tensor;
    /// let p = Param::new("w", Tensor::zeros(&[2]), true);
    /// let before = p.version();
    /// p.value_mut().data_mut()[0] = 1.0;
    /// assert_ne!(p.version(), before);
    /// ```
    pub fn version(&self) -> u64 {
        self.0.version.load(Ordering::Acquire)
    }

    /// Reads the accumulated gradient (None before the first backward or after `zero_grad`).
    pub fn grad(&self) -> RwLockReadGuard<'_, Option<Tensor>> {
        unpoison(self.0.grad.read())
    }

    /// Adds `g` to the gradient (or sets it, if there was none). `g` must have the value's
    /// shape, on every call (the first included): otherwise
    /// [`AutogradError::InvalidInput`](crate::AutogradError::InvalidInput) naming the parameter
    /// and both shapes, and the gradient is left as it was.
    ///
    /// ```
    /// use nibble_autograd::Param;
    /// use nibble_tensor::Tensor;
    /// let p = Param::new("w", Tensor::zeros(&[2, 3]), true);
    /// assert!(p.accumulate_grad(Tensor::zeros(&[3])).is_err());
    /// assert!(p.grad().is_none());
    /// p.accumulate_grad(Tensor::full(&[2, 3], 1.0)).unwrap();
    /// ```
    pub fn accumulate_grad(&self, g: Tensor) -> crate::Result<()> {
        // The value's shape first, its lock released before the gradient's is taken (no lock
        // held while waiting for another).
        self.check_grad_shape("accumulate_grad", g.shape())?;
        let mut slot = unpoison(self.0.grad.write());
        match slot.as_mut() {
            Some(acc) => acc.add_assign(&g)?,
            None => *slot = Some(g),
        }
        Ok(())
    }

    /// [`Param::accumulate_grad`] of the gradient `g` of a 1-D parameter (`[g.len()]`), where
    /// the parameter trains; a frozen one ignores it. The norms' backwards hand their weight
    /// and bias gradients over this way.
    ///
    /// ```
    /// use nibble_autograd::Param;
    /// use nibble_tensor::Tensor;
    /// let (w, frozen) = (Param::new("w", Tensor::zeros(&[2]), true), Param::new("f", Tensor::zeros(&[2]), false));
    /// w.accumulate_vec_grad(vec![1.0, 2.0]).unwrap();
    /// frozen.accumulate_vec_grad(vec![1.0, 2.0]).unwrap();
    /// assert_eq!(w.grad().as_ref().unwrap().data(), &[1.0, 2.0]);
    /// assert!(frozen.grad().is_none());
    /// ```
    pub fn accumulate_vec_grad(&self, g: Vec<f32>) -> crate::Result<()> {
        if !self.requires_grad() {
            return Ok(());
        }
        self.accumulate_grad(Tensor::from_vec(&[g.len()], g)?)
    }

    /// Checks that a gradient of `shape` fits this parameter's value:
    /// [`AutogradError::InvalidInput`](crate::AutogradError::InvalidInput) naming `op`, the
    /// parameter and both shapes otherwise.
    pub(crate) fn check_grad_shape(&self, op: &'static str, shape: &[usize]) -> crate::Result<()> {
        let value = self.value();
        if value.shape() == shape {
            return Ok(());
        }
        Err(crate::AutogradError::InvalidInput {
            op,
            what: format!(
                "parameter {}: gradient of shape {shape:?} for a value of shape {:?}",
                self.name(),
                value.shape()
            ),
        })
    }

    /// Mutable access to the gradient slot (for kernels that accumulate in place).
    pub fn grad_mut(&self) -> RwLockWriteGuard<'_, Option<Tensor>> {
        unpoison(self.0.grad.write())
    }

    /// Drops the gradient.
    pub fn zero_grad(&self) {
        *unpoison(self.0.grad.write()) = None;
    }

    /// Whether backward computes a gradient for this parameter.
    pub fn requires_grad(&self) -> bool {
        *unpoison(self.0.requires_grad.read())
    }

    /// Freezes (`false`) or unfreezes (`true`) the parameter.
    pub fn set_requires_grad(&self, requires_grad: bool) {
        *unpoison(self.0.requires_grad.write()) = requires_grad;
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.value().numel()
    }

    /// True if both handles point at the same parameter.
    pub fn same_as(&self, other: &Param) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
