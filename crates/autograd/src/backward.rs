//! The backward pass: topological order, reverse sweep, gradient accumulation, [`Grads`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moeba_kernels::cpu::{par, simd};
use moeba_kernels::ops::{self, BinaryOp};
use moeba_tensor::{CpuStorage, DType, Device, Error, Layout, Result, Storage, Tensor};

use crate::custom::no_backward_error;
use crate::var::{Node, Rule, Var, VarId};

/// The gradients of the leaves that require grad, keyed by their [`VarId`].
///
/// Gradients have their variable's shape, dtype and device, and are contiguous. A leaf that the
/// loss does not depend on (or reaches only through integer outputs) has no entry.
#[derive(Debug, Default, Clone)]
pub struct Grads {
    map: HashMap<VarId, Tensor>,
}

impl Grads {
    /// The gradient of `var`, if it received one.
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.map.get(&var.id())
    }

    /// The gradient of the variable with id `id`.
    pub fn get_id(&self, id: VarId) -> Option<&Tensor> {
        self.map.get(&id)
    }

    /// Takes the gradient of `var` out.
    pub fn remove(&mut self, var: &Var) -> Option<Tensor> {
        self.map.remove(&var.id())
    }

    /// Sets the gradient of `var` (replacing any), e.g. after clipping.
    pub fn insert(&mut self, var: &Var, grad: Tensor) -> Option<Tensor> {
        self.map.insert(var.id(), grad)
    }

    /// The number of gradients held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every (id, gradient) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (VarId, &Tensor)> {
        self.map.iter().map(|(&id, t)| (id, t))
    }
}

impl IntoIterator for Grads {
    type Item = (VarId, Tensor);
    type IntoIter = std::collections::hash_map::IntoIter<VarId, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

impl Var {
    /// The gradients of the loss `self` (which must hold exactly one element) with respect to
    /// every leaf that requires grad. See [`Var::backward_with`].
    pub fn backward(&self) -> Result<Grads> {
        if self.elem_count() != 1 {
            return Err(Error::bad_shape(
                "backward",
                self.shape(),
                "the loss must hold exactly one element. HINT: reduce it (sum_all, mean), or pass the \
                 gradient of the output with backward_with",
            ));
        }
        let seed = Tensor::ones(self.shape(), self.dtype(), self.device())?;
        self.backward_with(seed)
    }

    /// Reverse-mode sweep from `self` seeded with `grad` (d loss / d self; same shape and dtype).
    ///
    /// The nodes reachable from `self` are put in topological order by an iterative depth-first
    /// search, then visited consumers-first: each node receives the sum of the gradients of its
    /// outputs and passes gradients to its inputs. Returns the gradients of the leaves that
    /// require grad; intermediate gradients are dropped as soon as they are used. The tape is not
    /// consumed: backward may run again from the same result.
    ///
    /// Errors if `self` does not require grad, if `grad` does not match, if a fused op with no
    /// backward lies on a path that carries gradient (the error names it), or if a backward rule
    /// fails or returns a gradient of the wrong shape or dtype (naming the op).
    pub fn backward_with(&self, grad: Tensor) -> Result<Grads> {
        if grad.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                op: "backward_with",
                lhs: self.shape().clone(),
                rhs: grad.shape().clone(),
            });
        }
        if grad.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch { op: "backward_with", lhs: self.dtype(), rhs: grad.dtype() });
        }
        if !self.requires_grad() {
            return Err(Error::invalid(
                "backward",
                "loss",
                format!(
                    "{self:?} does not require grad: no input of its computation requires grad, or it was \
                     computed under no_grad() or from detached values"
                ),
            ));
        }
        let mut leaves: HashMap<VarId, Tensor> = HashMap::new();
        let Some(root) = self.node() else {
            leaves.insert(self.id(), grad);
            return finish(leaves);
        };
        let order = topo_order(root);
        let mut pending: HashMap<VarId, Tensor> = HashMap::from([(self.id(), grad)]);
        for node in order.iter().rev() {
            let grad_outputs: Vec<Option<Tensor>> =
                node.outputs.iter().map(|id| pending.remove(id)).collect();
            if grad_outputs.iter().all(Option::is_none) {
                continue;
            }
            let need: Vec<bool> = node.inputs.iter().map(Var::requires_grad).collect();
            let started = profiling().then(Instant::now);
            let grad_inputs = run_rule(node, &grad_outputs, &need)?;
            if let Some(t0) = started {
                record_profile(node.name, t0.elapsed());
            }
            if grad_inputs.len() != node.inputs.len() {
                return Err(Error::Msg(format!(
                    "backward of {}: returned {} gradients for {} inputs",
                    node.name,
                    grad_inputs.len(),
                    node.inputs.len()
                )));
            }
            for (i, (input, g)) in node.inputs.iter().zip(grad_inputs).enumerate() {
                let Some(g) = g else { continue };
                if !input.requires_grad() {
                    continue;
                }
                if g.shape() != input.shape() || g.dtype() != input.dtype() {
                    return Err(Error::Msg(format!(
                        "backward of {}: the gradient of input {i} is {:?}, but the input is {:?}",
                        node.name,
                        g,
                        input.tensor()
                    )));
                }
                let map = if input.is_leaf() { &mut leaves } else { &mut pending };
                let started = profiling().then(Instant::now);
                let added = map.contains_key(&input.id());
                accumulate(map, input.id(), g)?;
                if let (Some(t0), true) = (started, added) {
                    record_profile("(gradient accumulation)", t0.elapsed());
                }
            }
        }
        finish(leaves)
    }
}

static PROFILING: AtomicBool = AtomicBool::new(false);
static PROFILE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

fn profiling() -> bool {
    PROFILING.load(Ordering::Relaxed)
}

fn record_profile(name: &'static str, dt: Duration) {
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    let e = p.entry(name).or_insert((Duration::ZERO, 0));
    e.0 += dt;
    e.1 += 1;
}

/// Turns the backward profiler on or off (process-wide; off by default). While on, every
/// backward rule run by [`Var::backward_with`] is timed under its op's name, and the additions of
/// gradients of variables used more than once under `(gradient accumulation)`. For profiling
/// harnesses; the cost is two clock reads per node.
pub fn set_backward_profiling(on: bool) {
    PROFILING.store(on, Ordering::Relaxed);
}

/// The backward time per op name collected since the last call (total time, number of calls),
/// slowest first; clears the record.
pub fn take_backward_profile() -> Vec<(&'static str, Duration, u64)> {
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *p).into_iter().map(|(k, (d, n))| (k, d, n)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Adds `g` to the gradient held for `id` (the variable was used more than once).
fn accumulate(map: &mut HashMap<VarId, Tensor>, id: VarId, g: Tensor) -> Result<()> {
    let sum = match map.remove(&id) {
        Some(prev) => add_into(prev, &g)?,
        None => g,
    };
    map.insert(id, sum);
    Ok(())
}

/// `prev + g` (same shape and dtype, checked by the caller). When `prev` is a contiguous f32/f64
/// CPU tensor that owns its whole buffer alone (typically a gradient a backward rule just
/// allocated) and `g` is contiguous, `g` is added into that buffer in place: no allocation and one
/// pass fewer over memory. Otherwise (shared or strided `prev`, other dtypes and devices) this is
/// [`ops::add`], the reference the tests compare it with.
pub(crate) fn add_into(prev: Tensor, g: &Tensor) -> Result<Tensor> {
    let n = prev.elem_count();
    let eligible = prev.is_contiguous()
        && prev.layout().offset() == 0
        && g.is_contiguous()
        && prev.shape() == g.shape()
        && prev.dtype() == g.dtype()
        && matches!(prev.dtype(), DType::F32 | DType::F64)
        && matches!(prev.device(), Device::Cpu)
        && matches!(g.device(), Device::Cpu)
        && n > 0;
    if !eligible {
        return ops::add(&prev, g);
    }
    let shape = prev.shape().clone();
    let arc = prev.storage_arc().clone();
    drop(prev);
    let storage = match Arc::try_unwrap(arc) {
        Ok(Storage::Cpu(CpuStorage::F32(mut v))) if v.len() == n => {
            let gd = g.cpu_data::<f32>()?;
            par::for_each_chunk_mut(&mut v, |s, c| {
                let len = c.len();
                simd::binary_assign_f32(BinaryOp::Add, c, simd::Arg::Slice(&gd[s..s + len]))
            });
            CpuStorage::F32(v)
        }
        Ok(Storage::Cpu(CpuStorage::F64(mut v))) if v.len() == n => {
            let gd = g.cpu_data::<f64>()?;
            par::for_each_chunk_mut(&mut v, |s, c| {
                let len = c.len();
                c.iter_mut().zip(&gd[s..s + len]).for_each(|(a, &b)| *a += b)
            });
            CpuStorage::F64(v)
        }
        Ok(storage) => {
            let prev = Tensor::from_storage(storage, Layout::contiguous(shape), Device::Cpu)?;
            return ops::add(&prev, g);
        }
        Err(arc) => {
            let prev = Tensor::from_arc_storage(arc, Layout::contiguous(shape), Device::Cpu)?;
            return ops::add(&prev, g);
        }
    };
    Tensor::from_cpu_storage(storage, shape)
}

fn finish(leaves: HashMap<VarId, Tensor>) -> Result<Grads> {
    let map = leaves
        .into_iter()
        .map(|(id, g)| Ok((id, ops::contiguous(&g)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(Grads { map })
}

fn run_rule(node: &Node, grad_outputs: &[Option<Tensor>], need: &[bool]) -> Result<Vec<Option<Tensor>>> {
    match &node.rule {
        Rule::Builtin(f) => match grad_outputs {
            [Some(g)] => f(g, need),
            _ => Err(Error::Msg(format!("backward of {}: expected one output gradient", node.name))),
        },
        Rule::Custom { op, outputs } => {
            if !op.has_backward() {
                return Err(no_backward_error(op.name()));
            }
            let inputs: Vec<Tensor> = node.inputs.iter().map(|v| v.tensor().clone()).collect();
            op.backward(&inputs, outputs, grad_outputs)
        }
    }
}

/// Every node reachable from `root` through inputs that require grad, each after the producers
/// of its inputs (post-order of an explicit-stack depth-first search: no recursion).
fn topo_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let key = |n: &Arc<Node>| Arc::as_ptr(n) as usize;
    let mut order = Vec::new();
    let mut seen: HashSet<usize> = HashSet::from([key(root)]);
    let mut stack: Vec<(Arc<Node>, usize)> = vec![(root.clone(), 0)];
    while let Some((node, next)) = stack.last_mut() {
        if let Some(input) = node.inputs.get(*next) {
            *next += 1;
            if let Some(producer) = input.node() {
                if input.requires_grad() && seen.insert(key(producer)) {
                    let producer = producer.clone();
                    stack.push((producer, 0));
                }
            }
        } else if let Some((node, _)) = stack.pop() {
            order.push(node);
        }
    }
    order
}
