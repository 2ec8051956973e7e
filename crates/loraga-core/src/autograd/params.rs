//! Named parameters: the model's weights (frozen or trainable) and their accumulated gradients.

use std::collections::HashMap;
use std::sync::Arc;

use super::data::add_assign;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub struct Param {
    name: String,
    /// Shared with the tapes that use it, so recording a forward pass copies no weights.
    value: Arc<Tensor>,
    trainable: bool,
    grad: Option<Tensor>,
}

impl Param {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// The gradient summed over every backward pass since the last [`Params::zero_grad`].
    pub fn grad(&self) -> Option<&Tensor> {
        self.grad.as_ref()
    }

    /// The gradient, for an in-place change (clipping).
    pub fn grad_mut(&mut self) -> Option<&mut Tensor> {
        self.grad.as_mut()
    }

    /// The value, for an in-place update, beside the gradient (an optimizer step). The value is
    /// shared with every tape that recorded it, so this works only once those tapes are dropped;
    /// while one is alive it is an error, not a silent copy: a copy-on-write would double the
    /// memory of every parameter stepped under a forgotten tape.
    pub fn value_mut_and_grad(&mut self) -> Result<(&mut Tensor, Option<&Tensor>)> {
        match Arc::get_mut(&mut self.value) {
            Some(v) => Ok((v, self.grad.as_ref())),
            None => Err(Error::layer(
                "Param::value_mut_and_grad",
                &self.name,
                "a tape still holds this parameter's value; drop the tape (after its backward pass) before updating it",
            )),
        }
    }
}

/// Parameters by name, in insertion order.
#[derive(Default)]
pub struct Params {
    list: Vec<Param>,
    index: HashMap<String, usize>,
}

impl Params {
    pub fn new() -> Params {
        Params::default()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Adds a parameter; a name that is already there is an error (two weights with one name
    /// would silently shadow each other).
    pub fn insert(&mut self, name: impl Into<String>, value: Tensor, trainable: bool) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::layer("Params::insert", &name, "a parameter with this name already exists"));
        }
        self.index.insert(name.clone(), self.list.len());
        self.list.push(Param { name, value: Arc::new(value), trainable, grad: None });
        Ok(())
    }

    /// A copy of every parameter on `device`, each in the dtype `dtype_of` gives it (e.g. frozen
    /// weights in bf16, trainable ones in f32 as master copies), trainable flags kept, no
    /// gradients.
    pub fn to_device(&self, device: &crate::Device, dtype_of: impl Fn(&Param) -> crate::DType) -> Result<Params> {
        let mut out = Params::new();
        for p in &self.list {
            let value = p
                .value
                .to(device, dtype_of(p))
                .map_err(|e| Error::layer("Params::to_device", &p.name, e.to_string()))?;
            out.insert(p.name.clone(), value, p.trainable)?;
        }
        Ok(out)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn param(&self, name: &str) -> Result<&Param> {
        self.index
            .get(name)
            .map(|&i| &self.list[i])
            .ok_or_else(|| Error::layer("Params", name, format!("no such parameter ({} parameters)", self.list.len())))
    }

    fn param_mut(&mut self, name: &str) -> Result<&mut Param> {
        let n = self.list.len();
        match self.index.get(name) {
            Some(&i) => Ok(&mut self.list[i]),
            None => Err(Error::layer("Params", name, format!("no such parameter ({n} parameters)"))),
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        Ok(self.param(name)?.value())
    }

    pub(crate) fn shared(&self, name: &str) -> Result<Arc<Tensor>> {
        Ok(self.param(name)?.value.clone())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.list.iter()
    }

    /// Every parameter, mutable: for optimizers and clipping, which update values and gradients
    /// in place.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.list.iter_mut()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|p| p.name.as_str())
    }

    pub fn set_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        self.param_mut(name)?.trainable = trainable;
        Ok(())
    }

    /// Each named parameter's value read from `file` (a checkpoint, a fine-tuned model), kept on
    /// the parameter's device and in its dtype; a name the file or the parameters lack, or another
    /// shape, is an error naming it.
    pub fn load_from(&mut self, file: &crate::io::SafetensorsCheckpoint, names: &[String]) -> Result<()> {
        for name in names {
            let current = self.get(name)?;
            let (device, dtype) = (current.device(), current.dtype());
            let value = file.tensor(name, crate::DType::F32, &crate::Device::Cpu)?.to(&device, dtype)?;
            self.set_value(name, value)?;
        }
        Ok(())
    }

    /// Replaces a parameter's value (an optimizer step, an initialisation); the shape must stay.
    pub fn set_value(&mut self, name: &str, value: Tensor) -> Result<()> {
        let p = self.param_mut(name)?;
        if p.value.dims() != value.dims() {
            return Err(Error::layer(
                "Params::set_value",
                name,
                format!("new value has shape {:?}, the parameter is {:?}", value.dims(), p.value.dims()),
            ));
        }
        p.value = Arc::new(value);
        Ok(())
    }

    pub fn grad(&self, name: &str) -> Result<Option<&Tensor>> {
        Ok(self.param(name)?.grad())
    }

    /// Replaces the parameter's gradient (one computed outside a tape, or none); the shape must
    /// be the parameter's.
    pub fn set_grad(&mut self, name: &str, grad: Option<Tensor>) -> Result<()> {
        let p = self.param_mut(name)?;
        if let Some(g) = &grad
            && g.dims() != p.value.dims()
        {
            let msg = format!("gradient of shape {:?} for a parameter of shape {:?}", g.dims(), p.value.dims());
            return Err(Error::layer("Params::set_grad", name, msg));
        }
        p.grad = grad;
        Ok(())
    }

    /// Takes the accumulated gradient out, leaving none.
    pub fn take_grad(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.param_mut(name)?.grad.take())
    }

    /// Forgets every accumulated gradient (the start of an optimizer step's micro-batches).
    pub fn zero_grad(&mut self) {
        self.list.iter_mut().for_each(|p| p.grad = None);
    }

    /// Adds `g` into the parameter's gradient: the first one is stored as is.
    pub(crate) fn accumulate_grad(&mut self, name: &str, g: Tensor) -> Result<()> {
        let p = self.param_mut(name)?;
        match &mut p.grad {
            None => p.grad = Some(g),
            Some(acc) => add_assign(acc, &g, name)?,
        }
        Ok(())
    }
}
