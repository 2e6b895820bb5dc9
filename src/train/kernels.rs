//! The training kernels of the C++ shim that tch does not bind: multi-tensor (`_foreach_*`), fused
//! and capturable Adam steps, gradients set to none (src/shim/adam.cpp), and fp16 unscaling with
//! the inf/NaN check (src/shim/amp.cpp). Each has a plain fallback and is checked against it by the tests.

use std::ffi::{c_char, c_double, c_int, CStr};

use anyhow::{bail, Result};
use tch::Tensor;

extern "C" {
    fn trainer_grads_to_none(params: *const *const CTensorPtr, n: c_int);
    fn trainer_foreach_lerp(
        a: *const *const CTensorPtr,
        b: *const *const CTensorPtr,
        n: c_int,
        weight: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_foreach_adam_capturable(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        n: c_int,
        step: *const CTensorPtr,
        lr: *const CTensorPtr,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_fused_adam(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        steps: *const *const CTensorPtr,
        n: c_int,
        lr: c_double,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_unscale_and_check(
        grads: *const *const CTensorPtr,
        n: c_int,
        inv_scale: c_double,
        found: *mut c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_foreach_adam(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        n: c_int,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        lr_t: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
}

/// The opaque libtorch tensor behind a tch `Tensor` (an `at::Tensor`).
type CTensorPtr = torch_sys::C_tensor;

fn ptrs(ts: &[&Tensor]) -> Vec<*const CTensorPtr> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

/// Calls a shim entry point that returns 1 on failure with a message in the buffer it is given.
fn shim_call(f: impl FnOnce(*mut c_char, c_int) -> c_int) -> Result<()> {
    shim_call_for("multi-tensor op", f)
}

/// [`shim_call`], the error naming `what` failed.
pub(super) fn shim_call_for(what: &str, f: impl FnOnce(*mut c_char, c_int) -> c_int) -> Result<()> {
    let mut err = [0 as c_char; 512];
    let rc = f(err.as_mut_ptr(), err.len() as c_int);
    if rc != 0 {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("{what} failed: {msg}");
    }
    Ok(())
}

/// One Keras-style Adam step over whole lists (`_foreach_*` kernels: a few launches in all
/// instead of several per parameter).
#[allow(clippy::too_many_arguments)]
pub fn foreach_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr_t: f64,
) -> Result<()> {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n);
    let (p, g, mm, vv) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: four arrays of `n` live tensor pointers; the shim copies the handles.
    shim_call(|err, len| unsafe {
        trainer_foreach_adam(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            n as c_int,
            beta1,
            beta2,
            eps,
            lr_t,
            err,
            len,
        )
    })
}

/// Keras's Adam step with the step count (`step`, a 0-dim double tensor, incremented), the
/// learning rate (`lr`, likewise) and the step size as device tensors: nothing read from the
/// host, as a CUDA graph needs.
#[allow(clippy::too_many_arguments)]
pub fn foreach_adam_capturable(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    step: &Tensor,
    lr: &Tensor,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    let (p, g, mm, vv) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: four arrays of live tensor pointers of the same length and a live step tensor.
    shim_call(|err, len| unsafe {
        trainer_foreach_adam_capturable(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            p.len() as c_int,
            step.as_ptr(),
            lr.as_ptr(),
            beta1,
            beta2,
            eps,
            err,
            len,
        )
    })
}

/// PyTorch's fused Adam (`_fused_adam_`): `steps` (one float tensor per parameter) are
/// incremented, then the kernel applies the bias correction with them.
#[allow(clippy::too_many_arguments)]
pub fn fused_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    steps: &[&Tensor],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    let (p, g, mm, vv, s) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v), ptrs(steps));
    // SAFETY: five arrays of live tensor pointers of the same length.
    shim_call(|err, len| unsafe {
        trainer_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            s.as_ptr(),
            p.len() as c_int,
            lr,
            beta1,
            beta2,
            eps,
            err,
            len,
        )
    })
}

/// `a = lerp(a, b, weight)` for every pair, in a few multi-tensor kernels instead of one per
/// pair (on the CPU the same per-tensor arithmetic).
pub fn foreach_lerp(a: &[&Tensor], b: &[&Tensor], weight: f64) -> Result<()> {
    assert_eq!(a.len(), b.len());
    let (pa, pb) = (ptrs(a), ptrs(b));
    // SAFETY: two arrays of `n` live tensor pointers; the shim copies the handles.
    shim_call(|err, len| unsafe {
        trainer_foreach_lerp(
            pa.as_ptr(),
            pb.as_ptr(),
            pa.len() as c_int,
            weight,
            err,
            len,
        )
    })
}

/// Drops the gradients of `params` (set to none, not zeroed): no fill kernel per parameter, and
/// the next backward writes instead of accumulating.
pub fn grads_to_none(params: &[&Tensor]) {
    let p = ptrs(params);
    // SAFETY: an array of live tensor pointers.
    unsafe { trainer_grads_to_none(p.as_ptr(), p.len() as c_int) };
}

/// Multiplies every tensor by `inv_scale` and says whether any holds inf or NaN, in one
/// multi-tensor kernel and one read-back.
pub fn unscale_and_check(grads: &[&Tensor], inv_scale: f64) -> Result<bool> {
    let p = ptrs(grads);
    let mut found = 0;
    // SAFETY: an array of live tensor pointers; `found` and `err` are locals.
    shim_call(|err, len| unsafe {
        trainer_unscale_and_check(
            p.as_ptr(),
            p.len() as c_int,
            inv_scale,
            &mut found,
            err,
            len,
        )
    })?;
    Ok(found != 0)
}
