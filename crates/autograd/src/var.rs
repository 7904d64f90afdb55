//! [`Var`]: a tensor plus its place on the tape, and the graph [`Node`]s that ops record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moeba_tensor::{DType, Device, Result, Shape, Tensor};

use crate::custom::CustomOp;
use crate::grad_mode::is_grad_enabled;
use crate::op_kind::OpKind;

/// The unique identity of a [`Var`] (clones share it; every op result gets a fresh one).
/// [`Grads`](crate::Grads) is keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId(u64);

impl VarId {
    fn fresh() -> VarId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        VarId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id as a number (for logs and maps).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for VarId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "var#{}", self.0)
    }
}

/// A tensor on the tape: the value, a unique [`VarId`], whether it requires a gradient, and, for
/// op results, the node that produced it.
///
/// Cloning is cheap (an `Arc`) and keeps the identity: a clone is the same variable. A *leaf*
/// is a Var made by a constructor ([`Var::param`], [`Var::new`], [`Var::constant`]) or by
/// [`Var::detach`]; backward returns gradients for the leaves that require grad.
#[derive(Clone)]
pub struct Var(Arc<VarInner>);

// No Drop impl: `Node::drop` moves the node out of a VarInner it owns alone.
struct VarInner {
    id: VarId,
    tensor: Tensor,
    requires_grad: bool,
    node: Option<Arc<Node>>,
}

/// A recorded op application: its inputs (as Vars, which keeps them and their producers alive),
/// the ids of its outputs, and the backward rule with whatever it saved.
pub(crate) struct Node {
    pub(crate) name: &'static str,
    pub(crate) inputs: Vec<Var>,
    pub(crate) outputs: Vec<VarId>,
    pub(crate) rule: Rule,
}

/// A built-in backward rule: given the output gradient and which inputs need a gradient, the
/// gradient of each input (`None` where not needed or identically zero).
pub(crate) type RuleFn = dyn Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// How a node computes its input gradients.
pub(crate) enum Rule {
    /// A built-in op with one output.
    Builtin(Box<RuleFn>),
    /// A [`CustomOp`], with the outputs it produced (passed back to its backward).
    Custom { op: Box<dyn CustomOp>, outputs: Vec<Tensor> },
}

impl Drop for Node {
    /// Drops the chain of producers iteratively: a recursive drop of a 10k-node chain would
    /// overflow the stack.
    fn drop(&mut self) {
        let mut stack = std::mem::take(&mut self.inputs);
        while let Some(var) = stack.pop() {
            let Some(inner) = Arc::into_inner(var.0) else { continue };
            let Some(node) = inner.node else { continue };
            if let Some(mut node) = Arc::into_inner(node) {
                stack.append(&mut node.inputs);
            }
        }
    }
}

impl Var {
    // ---------------------------------------------------------------- constructors

    /// A leaf that requires a gradient (a trainable parameter or an input to differentiate).
    /// Integer tensors never require grad: for them this is [`Var::constant`].
    pub fn param(t: Tensor) -> Var {
        Var::new(t, true)
    }

    /// A leaf; `requires_grad` is ignored (false) for integer tensors.
    pub fn new(tensor: Tensor, requires_grad: bool) -> Var {
        let requires_grad = requires_grad && tensor.dtype().is_float();
        Var(Arc::new(VarInner { id: VarId::fresh(), tensor, requires_grad, node: None }))
    }

    /// A leaf that does not require a gradient.
    pub fn constant(t: Tensor) -> Var {
        Var::new(t, false)
    }

    /// A new leaf holding the same tensor (shared, no copy) that does not require grad: no
    /// gradient flows back through it to `self`.
    pub fn detach(&self) -> Var {
        Var::constant(self.tensor().clone())
    }

    // ---------------------------------------------------------------- accessors

    /// The value.
    pub fn tensor(&self) -> &Tensor {
        &self.0.tensor
    }

    /// The unique id (shared by clones).
    pub fn id(&self) -> VarId {
        self.0.id
    }

    /// Whether a gradient flows to this variable: true for leaves made to require it and for
    /// op results recorded on the tape.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// Whether this is a leaf (made by a constructor or [`Var::detach`], not recorded by an op).
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    /// The name of the op that produced this variable on the tape (`None` for leaves and for
    /// results computed without recording).
    pub fn op_name(&self) -> Option<&'static str> {
        self.0.node.as_ref().map(|n| n.name)
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.tensor().shape()
    }

    /// The dims, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.tensor().dims()
    }

    /// The size of dim `d`, or an error.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.tensor().dim(d)
    }

    /// The number of dims.
    pub fn rank(&self) -> usize {
        self.tensor().rank()
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.tensor().elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.tensor().dtype()
    }

    /// The device holding the value.
    pub fn device(&self) -> &Device {
        self.tensor().device()
    }

    pub(crate) fn node(&self) -> Option<&Arc<Node>> {
        self.0.node.as_ref()
    }

    // ---------------------------------------------------------------- recording

    /// Wraps the result `out` of built-in op `op` applied to `inputs`. Records a node with
    /// `rule` when grad mode is on, some input requires grad and `out` is a float tensor;
    /// otherwise returns `out` as a constant.
    pub(crate) fn record<F>(op: OpKind, out: Tensor, inputs: &[&Var], rule: F) -> Var
    where
        F: Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    {
        if !(out.dtype().is_float() && should_record(inputs)) {
            return Var::constant(out);
        }
        let id = VarId::fresh();
        let node = Node {
            name: op.name(),
            inputs: inputs.iter().map(|v| (*v).clone()).collect(),
            outputs: vec![id],
            rule: Rule::Builtin(Box::new(rule)),
        };
        Var(Arc::new(VarInner { id, tensor: out, requires_grad: true, node: Some(Arc::new(node)) }))
    }

    /// Puts the results of a fused op on the tape.
    ///
    /// `outputs` were computed by the caller from the tensors of `inputs` (typically by one fused
    /// kernel). When grad mode is on and some input requires grad, one node is recorded for the
    /// whole op; each float output becomes a Var that requires grad (integer outputs, such as the
    /// expert indices of a top-k gate, are constants). In the backward, [`CustomOp::backward`]
    /// receives the input tensors, these outputs and one gradient per output (`None` for the
    /// outputs that received none), so a scan's output and final state may each carry a gradient,
    /// or only one of them. An op without a backward makes [`Var::backward`] fail with its name
    /// when a gradient has to pass through it.
    ///
    /// Returns one Var per output, in order.
    pub fn apply_custom<O: CustomOp + 'static>(op: O, inputs: &[&Var], outputs: Vec<Tensor>) -> Vec<Var> {
        if !should_record(inputs) {
            return outputs.into_iter().map(Var::constant).collect();
        }
        let ids: Vec<VarId> = outputs.iter().map(|_| VarId::fresh()).collect();
        let node = Arc::new(Node {
            name: op.name(),
            inputs: inputs.iter().map(|v| (*v).clone()).collect(),
            outputs: ids.clone(),
            rule: Rule::Custom { op: Box::new(op), outputs: outputs.clone() },
        });
        outputs
            .into_iter()
            .zip(ids)
            .map(|(tensor, id)| {
                let float = tensor.dtype().is_float();
                Var(Arc::new(VarInner {
                    id,
                    tensor,
                    requires_grad: float,
                    node: float.then(|| node.clone()),
                }))
            })
            .collect()
    }
}

fn should_record(inputs: &[&Var]) -> bool {
    is_grad_enabled() && inputs.iter().any(|v| v.requires_grad())
}

impl From<Tensor> for Var {
    /// A constant (see [`Var::constant`]).
    fn from(t: Tensor) -> Var {
        Var::constant(t)
    }
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var({}, {:?}", self.id(), self.tensor())?;
        if self.requires_grad() {
            f.write_str(", requires_grad")?;
        }
        if let Some(name) = self.op_name() {
            write!(f, ", op {name}")?;
        }
        f.write_str(")")
    }
}
