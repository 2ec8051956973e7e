//! The tape: every op appends its output and a backward closure; [`Tape::backward`] walks it in
//! reverse. Recording order is a topological order, so when the walk reaches a node, every node
//! that used it has already sent it its gradient: the gradient is final there, and that is when
//! a parameter's hook fires. Weights with a gradient sink ([`GradSinks`]) skip the hook: their
//! gradient is added into the sink's buffer where it is computed (see `sink.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::data::add_assign;
use super::params::Params;
use super::sink::GradSinks;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A value recorded on a [`Tape`]: an index, valid for that tape only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// Maps (gradient of the output, input values, which inputs need a gradient) to one gradient per
/// input; `None` where none is needed.
pub(crate) type BackwardFn = Box<dyn FnOnce(&Tensor, &[&Tensor], &[bool]) -> Result<Vec<Option<Tensor>>>>;

/// What a gradient hook wants done with the gradient it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// Add it into the parameter's accumulated gradient as usual.
    Keep,
    /// The hook consumed it: drop it now (LoRA-GA's estimation pass).
    Drop,
}

/// Called once per trainable parameter per backward pass, with the parameter's name and its
/// gradient from this pass, as soon as that gradient is final.
pub type GradHook<'a> = dyn FnMut(&str, &Tensor) -> Result<HookAction> + 'a;

enum Kind {
    /// An input that is not a named parameter (gradients returned in [`LeafGrads`]).
    Leaf,
    Param(String),
    Op {
        inputs: Vec<Var>,
        backward: BackwardFn,
        /// The op's gradient with respect to one input is `dYᵀ X` with X another input, so a
        /// sink can take it in place (see [`WeightGrad`]).
        weight_grad: Option<WeightGrad>,
    },
}

/// Declares that the gradient of input `weight` is `dYᵀ · input x` (input indices): the
/// linear layer's dW = dYᵀ X. A sink on that weight then runs the product into its buffer and the
/// op's backward is told it need not compute that gradient.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightGrad {
    pub weight: usize,
    pub x: usize,
}

struct Node {
    op: &'static str,
    value: Arc<Tensor>,
    requires_grad: bool,
    kind: Kind,
}

#[derive(Default)]
pub struct Tape {
    nodes: Vec<Node>,
    /// A parameter is recorded once per tape, at its first use, so its gradient is complete
    /// (summed over every use, e.g. a tied embedding) when the hook sees it.
    params: HashMap<String, Var>,
    /// Parameters whose gradient goes to a sink on this tape ([`Tape::sink`]).
    sunk: HashSet<String>,
}

/// Gradients of the non-parameter leaves that asked for one (inputs in gradient checks).
#[derive(Debug, Default)]
pub struct LeafGrads(HashMap<Var, Tensor>);

impl LeafGrads {
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.0.get(&v)
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// An input; with `requires_grad` its gradient comes back from [`Tape::backward`].
    pub fn leaf(&mut self, value: Tensor, requires_grad: bool) -> Var {
        self.push(Node { op: "leaf", value: Arc::new(value), requires_grad, kind: Kind::Leaf })
    }

    /// An input that needs no gradient.
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.leaf(value, false)
    }

    /// Declares that the named parameter's gradient goes to a sink given to
    /// [`Tape::backward_into`]: it is computed even if the parameter is frozen. Call it before the
    /// forward pass first uses the parameter.
    pub fn sink(&mut self, name: &str) -> Result<()> {
        if self.params.contains_key(name) {
            return Err(Error::layer(
                "Tape::sink",
                name,
                "already used on this tape; declare its sink before the forward pass",
            ));
        }
        self.sunk.insert(name.to_string());
        Ok(())
    }

    /// The named parameter, recorded at its first use on this tape. It needs a gradient when it
    /// is trainable or has a sink.
    pub fn param(&mut self, params: &Params, name: &str) -> Result<Var> {
        if let Some(&v) = self.params.get(name) {
            return Ok(v);
        }
        let p = params.param(name)?;
        let node = Node {
            op: "param",
            value: params.shared(name)?,
            requires_grad: p.trainable() || self.sunk.contains(name),
            kind: Kind::Param(name.into()),
        };
        let v = self.push(node);
        self.params.insert(name.to_string(), v);
        Ok(v)
    }

    /// The named parameter in `dtype`: cast on the tape when it is stored in another one (f32
    /// master weights used by a bf16 forward, as PyTorch's autocast does).
    pub fn param_as(&mut self, params: &Params, name: &str, dtype: crate::DType) -> Result<Var> {
        let v = self.param(params, name)?;
        if self.value(v).dtype() == dtype { Ok(v) } else { self.cast(v, dtype) }
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    /// The value of `v`, taken out of the tape, which is dropped: how a forward-only caller (the
    /// decoder) keeps one result without copying it. A value shared elsewhere (a parameter's) is
    /// copied.
    pub fn into_value(mut self, v: Var) -> Result<Tensor> {
        let value = std::mem::take(&mut self.nodes).swap_remove(v.0).value;
        Arc::try_unwrap(value).or_else(|shared| shared.to(&shared.device(), shared.dtype()))
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    fn push(&mut self, node: Node) -> Var {
        self.nodes.push(node);
        Var(self.nodes.len() - 1)
    }

    /// Records an op's output. The closure is kept only if some input needs a gradient.
    pub(crate) fn push_op(&mut self, op: &'static str, value: Tensor, inputs: &[Var], backward: BackwardFn) -> Var {
        self.push_weight_op(op, value, inputs, backward, None)
    }

    /// [`Tape::push_op`] for an op that declares its weight gradient ([`WeightGrad`]).
    pub(crate) fn push_weight_op(
        &mut self,
        op: &'static str,
        value: Tensor,
        inputs: &[Var],
        backward: BackwardFn,
        weight_grad: Option<WeightGrad>,
    ) -> Var {
        let requires_grad = inputs.iter().any(|&v| self.requires_grad(v));
        let kind = if requires_grad { Kind::Op { inputs: inputs.to_vec(), backward, weight_grad } } else { Kind::Leaf };
        self.push(Node { op, value: Arc::new(value), requires_grad, kind })
    }

    /// The parameter `v` is, directly or through dtype casts (which leave the gradient's values
    /// alone, so a sink may take it in f32 before the cast's backward would).
    fn param_behind(&self, mut v: Var) -> Option<&str> {
        loop {
            match &self.nodes[v.0].kind {
                Kind::Param(name) => return Some(name),
                Kind::Op { inputs, .. } if self.nodes[v.0].op == "cast" && inputs.len() == 1 => v = inputs[0],
                _ => return None,
            }
        }
    }

    /// Backpropagates from a scalar `loss` (any shape with one element), seeding it with 1.
    pub fn backward(self, loss: Var, params: &mut Params, hook: Option<&mut GradHook>) -> Result<LeafGrads> {
        let seed = self.unit_seed(loss)?;
        self.backward_with(loss, seed, params, hook)
    }

    /// [`Tape::backward`] with gradient sinks: the weights declared with [`Tape::sink`] (exactly
    /// those, else an error naming the weight) have their gradients added into `sinks`.
    pub fn backward_into(
        self,
        loss: Var,
        params: &mut Params,
        hook: Option<&mut GradHook>,
        sinks: &mut GradSinks,
    ) -> Result<LeafGrads> {
        let seed = self.unit_seed(loss)?;
        self.walk(loss, seed, params, hook, sinks)
    }

    /// Backpropagates `seed` (the gradient of some scalar with respect to `root`). Trainable
    /// parameters' gradients go to `hook` if given, and into `params` unless the hook drops them.
    /// The tape is consumed: each node's value is freed as soon as the walk has passed it.
    pub fn backward_with(
        self,
        root: Var,
        seed: Tensor,
        params: &mut Params,
        hook: Option<&mut GradHook>,
    ) -> Result<LeafGrads> {
        self.walk(root, seed, params, hook, &mut GradSinks::new())
    }

    fn unit_seed(&self, loss: Var) -> Result<Tensor> {
        let n = self.value(loss).shape().elem_count();
        if n != 1 {
            return Err(Error::shape("backward", format!("the loss must have one element, it has {n}")));
        }
        let value = self.value(loss);
        Tensor::full(value.dims(), value.dtype(), 1.0, &value.device())
    }

    /// Every declared sink has a buffer and every buffer a declaration.
    fn check_sinks(&self, sinks: &GradSinks) -> Result<()> {
        if let Some(name) = self.sunk.iter().find(|n| !sinks.contains(n)) {
            return Err(Error::layer("backward", name, "declared with Tape::sink, but no sink buffer was given"));
        }
        if let Some(name) = sinks.names().find(|n| !self.sunk.contains(*n)) {
            return Err(Error::layer(
                "backward",
                name,
                "a sink buffer was given, but the tape never declared it (Tape::sink)",
            ));
        }
        Ok(())
    }

    fn walk(
        mut self,
        root: Var,
        seed: Tensor,
        params: &mut Params,
        mut hook: Option<&mut GradHook>,
        sinks: &mut GradSinks,
    ) -> Result<LeafGrads> {
        super::data::expect_shape(&seed, self.value(root).dims(), "backward", "the seed gradient")?;
        self.check_sinks(sinks)?;
        sinks.start_pass();
        self.nodes.truncate(root.0 + 1);
        let mut grads: Vec<Option<Tensor>> = (0..self.nodes.len()).map(|_| None).collect();
        grads[root.0] = Some(seed);
        let mut leaves = LeafGrads::default();
        while let Some(node) = self.nodes.pop() {
            let i = self.nodes.len();
            let Some(g) = grads[i].take() else { continue };
            if !node.requires_grad {
                continue;
            }
            match node.kind {
                Kind::Leaf => {
                    leaves.0.insert(Var(i), g);
                }
                Kind::Param(name) => {
                    if let Some(sink) = sinks.get_mut(&name) {
                        sink.add_grad(&g, &name)?;
                        continue;
                    }
                    let action = match hook.as_mut() {
                        Some(h) => h(&name, &g)?,
                        None => HookAction::Keep,
                    };
                    if action == HookAction::Keep {
                        params.accumulate_grad(&name, g)?;
                    }
                }
                Kind::Op { inputs, backward, weight_grad } => {
                    let values: Vec<Arc<Tensor>> = inputs.iter().map(|v| self.nodes[v.0].value.clone()).collect();
                    let refs: Vec<&Tensor> = values.iter().map(|v| v.as_ref()).collect();
                    let mut needs: Vec<bool> = inputs.iter().map(|v| self.nodes[v.0].requires_grad).collect();
                    if let Some(wg) = weight_grad
                        && needs[wg.weight]
                        && let Some(name) = self.param_behind(inputs[wg.weight])
                        && let Some(sink) = sinks.get_mut(name)
                    {
                        sink.add_weight_grad(&g, refs[wg.x], name)?;
                        needs[wg.weight] = false;
                    }
                    let input_grads = backward(&g, &refs, &needs)?;
                    for ((v, ig), need) in inputs.iter().zip(input_grads).zip(needs) {
                        let Some(ig) = ig else { continue };
                        if !need {
                            continue;
                        }
                        let input = &self.nodes[v.0];
                        if ig.dims() != input.value.dims() {
                            return Err(Error::shape(
                                node.op,
                                format!("backward produced {:?} for an input of {:?}", ig.dims(), input.value.dims()),
                            ));
                        }
                        match &mut grads[v.0] {
                            slot @ None => *slot = Some(ig),
                            Some(acc) => add_assign(acc, &ig, node.op)?,
                        }
                    }
                }
            }
        }
        Ok(leaves)
    }
}
