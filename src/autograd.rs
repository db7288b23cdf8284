//! The tape: reverse-mode automatic differentiation.
//!
//! Every op applied to a `Var` that depends on a leaf appends one node: the
//! ids of its inputs and a backward closure that maps the output gradient to
//! input gradients. Ops on constants record nothing (teacher features, masks
//! and attention never get a gradient). `backward` walks the nodes in reverse
//! creation order and accumulates gradients in a `Vec` indexed by node id, so
//! the summation order, and therefore every bit of the result, is fixed.
//!
//! Backward closures are `FnOnce`: running the backward pass consumes them,
//! which frees the activations they captured as soon as they are used.

use std::cell::RefCell;
use std::rc::Rc;

use crate::backend::{Backend, BackendRef, Binary};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// A backward function: `(backend, output gradient, which inputs need a
/// gradient) -> one gradient per input (None where not needed)`. The output
/// gradient is handed over, not lent: the function can drop it (and the
/// activations it captured) as soon as it has used them, before allocating
/// the input gradients, which lowers the backward pass's peak memory.
pub type BackwardFn<T> =
    Box<dyn FnOnce(&dyn Backend<T>, Tensor<T>, &[bool]) -> Result<Vec<Option<Tensor<T>>>>>;

struct Node<T: Float> {
    /// Node id of each input that requires a gradient (None for constants).
    inputs: Vec<Option<usize>>,
    /// None for leaves, and for interior nodes once their backward ran.
    backward: Option<BackwardFn<T>>,
    is_leaf: bool,
    shape: Vec<usize>,
}

struct TapeInner<T: Float> {
    backend: BackendRef<T>,
    nodes: RefCell<Vec<Node<T>>>,
    /// Unique to this tape in the process: node ids are per tape, so
    /// [`Gradients`] checks it before reading a Var's node id.
    id: u64,
}

/// Source of [`TapeInner::id`].
static NEXT_TAPE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A recording of operations, bound to one backend. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tape<T: Float> {
    inner: Rc<TapeInner<T>>,
}

/// A tensor on a tape: a value, plus a node id when it depends on a leaf.
#[derive(Clone)]
pub struct Var<T: Float> {
    value: Tensor<T>,
    node: Option<usize>,
    tape: Tape<T>,
}

impl<T: Float> std::fmt::Debug for Var<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var(node {:?}, {:?})", self.node, self.value)
    }
}

impl<T: Float> Tape<T> {
    /// An empty tape whose ops run on `backend`.
    pub fn new(backend: BackendRef<T>) -> Self {
        Tape {
            inner: Rc::new(TapeInner {
                backend,
                nodes: RefCell::new(Vec::new()),
                id: NEXT_TAPE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            }),
        }
    }

    /// The backend the ops run on.
    pub fn backend(&self) -> &dyn Backend<T> {
        &*self.inner.backend
    }

    /// A leaf that requires a gradient (a parameter or a student feature).
    pub fn leaf(&self, value: Tensor<T>) -> Var<T> {
        let id = self.push(Node {
            inputs: Vec::new(),
            backward: None,
            is_leaf: true,
            shape: value.shape().to_vec(),
        });
        Var {
            value,
            node: Some(id),
            tape: self.clone(),
        }
    }

    /// A constant: no gradient flows into it.
    pub fn constant(&self, value: Tensor<T>) -> Var<T> {
        Var {
            value,
            node: None,
            tape: self.clone(),
        }
    }

    /// Number of nodes recorded so far.
    pub fn len(&self) -> usize {
        self.inner.nodes.borrow().len()
    }

    /// True when nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, node: Node<T>) -> usize {
        let mut nodes = self.inner.nodes.borrow_mut();
        nodes.push(node);
        nodes.len() - 1
    }

    /// Record an op with output `value`. `backward` is called only if some
    /// input requires a gradient; it must return one entry per input, with
    /// a gradient of the input's shape wherever `needs[i]` is true.
    ///
    /// This is the public extension point: every op in `crate::ops` is built
    /// on it, and so can a user's own op.
    pub fn record(
        &self,
        inputs: &[&Var<T>],
        value: Tensor<T>,
        backward: impl FnOnce(&dyn Backend<T>, Tensor<T>, &[bool]) -> Result<Vec<Option<Tensor<T>>>>
        + 'static,
    ) -> Result<Var<T>> {
        for v in inputs {
            if !Rc::ptr_eq(&v.tape.inner, &self.inner) {
                return Err(Error::Autograd(
                    "an op mixes variables from different tapes".into(),
                ));
            }
        }
        let ids: Vec<Option<usize>> = inputs.iter().map(|v| v.node).collect();
        if ids.iter().all(Option::is_none) {
            return Ok(self.constant(value));
        }
        let id = self.push(Node {
            inputs: ids,
            backward: Some(Box::new(backward)),
            is_leaf: false,
            shape: value.shape().to_vec(),
        });
        Ok(Var {
            value,
            node: Some(id),
            tape: self.clone(),
        })
    }
}

impl<T: Float> Var<T> {
    /// The value.
    pub fn value(&self) -> &Tensor<T> {
        &self.value
    }
    /// The value, taken out (a scalar zero left in its place), for an op
    /// that may write its output into the value's buffer: the Var keeps the
    /// node and tape that op records, and is dropped after it.
    pub(crate) fn take_value(&mut self) -> Tensor<T> {
        std::mem::replace(&mut self.value, Tensor::scalar(T::zero()))
    }
    /// The value's shape.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// The tape this variable lives on.
    pub fn tape(&self) -> &Tape<T> {
        &self.tape
    }
    /// The tape's backend.
    pub fn backend(&self) -> &dyn Backend<T> {
        self.tape.backend()
    }
    /// True when gradients flow into this variable.
    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }
    /// Run the backward pass from this scalar (one-element) variable.
    /// Consumes the recorded backward closures: a tape is differentiated once.
    pub fn backward(&self) -> Result<Gradients<T>> {
        let Some(root) = self.node else {
            return Err(Error::Autograd(
                "backward from a value that depends on no leaf".into(),
            ));
        };
        if self.value.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a single-element output, got shape {:?}",
                self.value.shape()
            )));
        }
        let _pass = crate::pool::BackwardPass::begin();
        let backend = self.tape.inner.backend.clone();
        let nodes = &self.tape.inner.nodes;
        let mut grads: Vec<Option<Tensor<T>>> = vec![None; root + 1];
        grads[root] = Some(Tensor::ones(self.value.shape())?);
        let mut leaf_grads: Vec<Option<Tensor<T>>> = vec![None; root + 1];
        for i in (0..=root).rev() {
            let Some(g) = grads[i].take() else { continue };
            let (inputs, f) = {
                let mut nodes = nodes.borrow_mut();
                let node = &mut nodes[i];
                if node.is_leaf {
                    leaf_grads[i] = Some(g);
                    continue;
                }
                let f = node
                    .backward
                    .take()
                    .ok_or_else(|| Error::Autograd("backward already ran on this tape".into()))?;
                (node.inputs.clone(), f)
            };
            let needs: Vec<bool> = inputs.iter().map(Option::is_some).collect();
            let input_grads = f(&*backend, g, &needs)?;
            if input_grads.len() != inputs.len() {
                return Err(Error::Autograd(format!(
                    "node {i}: backward returned {} gradients for {} inputs",
                    input_grads.len(),
                    inputs.len()
                )));
            }
            for (input, ig) in inputs.into_iter().zip(input_grads) {
                let (Some(j), Some(ig)) = (input, ig) else {
                    continue;
                };
                let want = &nodes.borrow()[j].shape;
                if ig.shape() != want.as_slice() {
                    return Err(Error::Autograd(format!(
                        "node {i}: gradient of shape {:?} for an input of shape {want:?}",
                        ig.shape()
                    )));
                }
                // The sum may go into the running total's own buffer.
                grads[j] = Some(match grads[j].take() {
                    None => ig,
                    Some(acc) => backend.binary_owned(Binary::Add, acc, &ig, want)?,
                });
            }
        }
        Ok(Gradients {
            grads: leaf_grads,
            tape_id: self.tape.inner.id,
        })
    }
}

/// Gradients of the leaves, from one backward pass.
pub struct Gradients<T: Float> {
    grads: Vec<Option<Tensor<T>>>,
    /// The tape of the pass: a Var of another tape has node ids that mean
    /// nothing here.
    tape_id: u64,
}

impl<T: Float> std::fmt::Debug for Gradients<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.grads.iter().filter(|g| g.is_some()).count();
        write!(f, "Gradients({n} leaves)")
    }
}

impl<T: Float> Gradients<T> {
    /// The gradient of a leaf; None if it is not a leaf of this pass (of
    /// another tape, say) or the output does not depend on it.
    pub fn get(&self, v: &Var<T>) -> Option<&Tensor<T>> {
        v.node
            .filter(|_| v.tape.inner.id == self.tape_id)
            .and_then(|i| self.grads.get(i))
            .and_then(Option::as_ref)
    }

    /// The gradient of a leaf, or zeros of its shape if the output does not depend on it.
    pub fn get_or_zeros(&self, v: &Var<T>) -> Result<Tensor<T>> {
        match self.get(v) {
            Some(g) => Ok(g.clone()),
            None => Tensor::zeros(v.shape()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;
    use std::sync::Arc;

    fn tape() -> Tape<f64> {
        Tape::new(Arc::new(ReferenceBackend))
    }

    /// The pool frees held huge buffers on every miss while a backward
    /// pass runs (`pool::keeps_huge_buffers`): the pass must say so.
    #[test]
    fn the_pool_knows_a_backward_pass_runs_while_its_closures_do() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let t = tape();
        let x = t.leaf(Tensor::scalar(2.0));
        let seen = Arc::new(AtomicBool::new(false));
        let s = seen.clone();
        let y = t
            .record(&[&x], Tensor::scalar(2.0), move |_, g, _| {
                s.store(crate::pool::in_backward(), Ordering::Relaxed);
                Ok(vec![Some(g)])
            })
            .unwrap();
        y.backward().unwrap();
        assert!(seen.load(Ordering::Relaxed));
    }

    #[test]
    fn constants_record_nothing_and_get_no_gradient() {
        let t = tape();
        assert!(t.is_empty());
        let c = t.constant(Tensor::from_vec(&[2], vec![1.0, 2.0]).unwrap());
        let k = c.square().unwrap().scale(3.0).unwrap();
        assert!(!c.requires_grad() && !k.requires_grad());
        assert_eq!(t.len(), 0, "ops on constants must not be recorded");
        let x = t.leaf(Tensor::from_vec(&[2], vec![0.5, -1.0]).unwrap());
        assert!(x.requires_grad());
        assert_eq!(t.len(), 1);
        assert!(!t.is_empty());
        let y = x.mul(&k).unwrap();
        assert!(y.requires_grad());
        assert_eq!(t.len(), 2);
        let g = y.sum_all().unwrap().backward().unwrap();
        // d/dx sum(x * k) = k = 3 c^2; the constant has no gradient.
        assert_eq!(g.get(&x).unwrap().as_slice(), &[3.0, 12.0]);
        assert!(g.get(&c).is_none());
        assert_eq!(format!("{g:?}"), "Gradients(1 leaves)");
        assert!(format!("{x:?}").starts_with("Var(node Some(0)"));
    }

    #[test]
    fn gradients_of_a_reused_value_accumulate() {
        let t = tape();
        let x = t.leaf(Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap());
        // y = x * x + x: dy/dx = 2x + 1, from three uses of x.
        let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        assert_eq!(g.get(&x).unwrap().as_slice(), &[3.0, 5.0, 7.0]);
        // A leaf the output does not depend on gets zeros from get_or_zeros.
        let unused = t.leaf(Tensor::from_vec(&[2], vec![1.0, 1.0]).unwrap());
        assert!(g.get(&unused).is_none());
        assert_eq!(g.get_or_zeros(&unused).unwrap().as_slice(), &[0.0, 0.0]);
    }
}
