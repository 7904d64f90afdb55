//! No-grad mode: a thread-local switch that stops ops from recording nodes.

use std::cell::Cell;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread currently record nodes (false inside a [`no_grad`] scope).
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Restores the previous grad mode of its thread when dropped. Made by [`no_grad`].
#[must_use = "no-grad mode ends when the guard is dropped; bind it: `let _g = no_grad();`"]
pub struct NoGradGuard {
    prev: bool,
    // Not Send: the guard restores a thread-local flag and must drop on the thread that made it.
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Turns recording off on this thread until the returned guard is dropped.
///
/// Inside the scope ops compute as usual but record no node: their results do not require
/// grad. Scopes nest; each guard restores the mode it found. The flag is per thread.
///
/// ```
/// use moeba_autograd::{no_grad, Var};
/// use moeba_tensor::{Device, Tensor};
/// let w = Var::param(Tensor::from_vec(vec![1.0f32, 2.0], 2, &Device::Cpu)?);
/// let y = {
///     let _g = no_grad();
///     w.exp()?
/// };
/// assert!(!y.requires_grad());
/// # Ok::<(), moeba_tensor::Error>(())
/// ```
pub fn no_grad() -> NoGradGuard {
    let prev = GRAD_ENABLED.with(|g| g.replace(false));
    NoGradGuard { prev, _not_send: std::marker::PhantomData }
}

/// Turns recording on for this thread until the returned guard is dropped (the opposite of
/// [`no_grad`]; used by [`checkpoint`](crate::checkpoint)'s recompute, which the engine may run
/// inside a no-grad scope).
pub(crate) fn enable_grad() -> NoGradGuard {
    let prev = GRAD_ENABLED.with(|g| g.replace(true));
    NoGradGuard { prev, _not_send: std::marker::PhantomData }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Runs `f` with recording off on this thread (the closure form of [`no_grad`]).
pub fn with_no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = no_grad();
    f()
}
