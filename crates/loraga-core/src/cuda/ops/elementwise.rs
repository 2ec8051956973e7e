//! Launchers of `kernels/elementwise.cu`: add, mul, scale, SiLU and SwiGLU forward and backward,
//! the f32 <-> bf16 cast and in-place gradient accumulation. Every function takes dense buffers
//! of equal length; the result has the first operand's dtype unless it says otherwise.

use std::ops::Deref;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{arg, arg_mut, expect, grid_stride, output};
use crate::cuda::device::CudaDevice;
use crate::cuda::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE: &str = "elementwise";

/// The launch for `n` elements: a thread moves at least 4 of them per step.
fn grid(dev: &CudaDevice, n: usize) -> LaunchConfig {
    grid_stride(dev, n.div_ceil(4))
}

/// `a + b`.
pub fn add(a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    binary("add", a, b)
}

/// `a * b` (also mul's backward: `dy * b`, `dy * a`).
pub fn mul(a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    binary("mul", a, b)
}

/// `silu(g) * u`.
pub fn swiglu_fwd(g: &CudaStorage, u: &CudaStorage) -> Result<CudaStorage> {
    binary("swiglu_fwd", g, u)
}

/// `dy * silu'(x)`, in dy's dtype (which must be x's).
pub fn silu_bwd(dy: &CudaStorage, x: &CudaStorage) -> Result<CudaStorage> {
    binary("silu_bwd", dy, x)
}

/// `s * x`.
pub fn scale(x: &CudaStorage, s: f32) -> Result<CudaStorage> {
    let mut y = output(&x.device, x.dtype(), x.len())?;
    launch(&format!("scale_{}", x.dtype()), &[x], &mut [&mut y], Some(s))?;
    Ok(y)
}

/// `silu(x) = x sigmoid(x)`.
pub fn silu_fwd(x: &CudaStorage) -> Result<CudaStorage> {
    let mut y = output(&x.device, x.dtype(), x.len())?;
    launch(&format!("silu_fwd_{}", x.dtype()), &[x], &mut [&mut y], None)?;
    Ok(y)
}

/// SwiGLU's backward: (`dy * u * silu'(g)`, `dy * silu(g)`), both in g's dtype (dy and u must
/// have it too).
pub fn swiglu_bwd(dy: &CudaStorage, g: &CudaStorage, u: &CudaStorage) -> Result<(CudaStorage, CudaStorage)> {
    let (dev, n, dt) = (&g.device, g.len(), g.dtype());
    expect("swiglu backward", "the output gradient", dy, dev, dt, n)?;
    expect("swiglu backward", "up", u, dev, dt, n)?;
    let (mut dg, mut du) = (output(dev, dt, n)?, output(dev, dt, n)?);
    launch(&format!("swiglu_bwd_{dt}"), &[dy, g, u], &mut [&mut dg, &mut du], None)?;
    Ok((dg, du))
}

/// `x` converted to `dtype` (a copy when it already has it): bf16 -> f32 is exact, f32 -> bf16
/// rounds to nearest even.
pub fn cast(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    if x.dtype() == dtype {
        let stream = x.device.stream();
        let slice = match &x.slice {
            CudaSlices::F32(s) => CudaSlices::F32(stream.clone_dtod(s).map_err(Error::cuda("cuMemcpyDtoD"))?),
            CudaSlices::BF16(s) => CudaSlices::BF16(stream.clone_dtod(s).map_err(Error::cuda("cuMemcpyDtoD"))?),
        };
        return Ok(CudaStorage { slice, device: x.device.clone() });
    }
    let mut y = output(&x.device, dtype, x.len())?;
    launch(&format!("cast_{}_{dtype}", x.dtype()), &[x], &mut [&mut y], None)?;
    Ok(y)
}

/// `acc += g` in place, for any pair of f32 and bf16 (the sum is formed in f32 and stored in
/// acc's dtype). `what` names the gradient in errors.
pub fn add_assign(acc: &mut CudaStorage, g: &CudaStorage, what: &str) -> Result<()> {
    expect("gradient accumulation", what, g, &acc.device, g.dtype(), acc.len())?;
    launch(&format!("add_assign_{}_{}", acc.dtype(), g.dtype()), &[g], &mut [acc], None)
}

/// A buffer seen in a wanted dtype: itself when it has it, else a converted copy.
pub enum AsDtype<'a> {
    Same(&'a CudaStorage),
    Cast(CudaStorage),
}

impl Deref for AsDtype<'_> {
    type Target = CudaStorage;
    fn deref(&self) -> &CudaStorage {
        match self {
            AsDtype::Same(s) => s,
            AsDtype::Cast(s) => s,
        }
    }
}

/// `s` in `dtype`, converting only when needed. Backward passes use it on the incoming
/// gradient: it normally has the op's output dtype, but a value used both as an activation and
/// as a weight-like input collects an f32 gradient beside a bf16 one.
pub fn as_dtype(s: &CudaStorage, dtype: DType) -> Result<AsDtype<'_>> {
    Ok(if s.dtype() == dtype { AsDtype::Same(s) } else { AsDtype::Cast(cast(s, dtype)?) })
}

/// `<op>_<t>(const T* a, const T* b, T* y, i64 n)` on two buffers of one dtype and length.
fn binary(op: &'static str, a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    expect(op, "the second operand", b, &a.device, a.dtype(), a.len())?;
    let mut y = output(&a.device, a.dtype(), a.len())?;
    launch(&format!("{op}_{}", a.dtype()), &[a, b], &mut [&mut y], None)?;
    Ok(y)
}

/// Launches kernel `name` with elementwise.cu's calling convention,
/// `(const In* inputs..., Out* outputs..., i64 n [, float scalar])`, over n elements: the
/// outputs' length. The element types are the ones `name` says; every buffer must be on the
/// outputs' device and hold n elements (checked here).
fn launch(name: &str, inputs: &[&CudaStorage], outputs: &mut [&mut CudaStorage], scalar: Option<f32>) -> Result<()> {
    let (dev, n) = (outputs[0].device.clone(), outputs[0].len());
    for s in inputs.iter().copied().chain(outputs.iter().map(|s| &**s)) {
        if s.device != dev || s.len() != n {
            return Err(Error::shape(
                "elementwise",
                format!("{name}: operands of {} and {n} elements on {:?} and {dev:?}", s.len(), s.device),
            ));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(MODULE, name)?;
    let n64 = n as i64;
    let mut builder = dev.stream().launch_builder(&f);
    for s in inputs {
        arg(&mut builder, s);
    }
    for s in outputs.iter_mut() {
        arg_mut(&mut builder, s);
    }
    builder.arg(&n64);
    if let Some(s) = &scalar {
        builder.arg(s);
    }
    // SAFETY: the arguments follow the calling convention above, in the element types the kernel
    // name gives (the callers allocate and check them so), and every buffer holds n elements.
    unsafe { builder.launch(grid(&dev, n)) }.map_err(Error::cuda("cuLaunchKernel(elementwise)"))?;
    Ok(())
}
