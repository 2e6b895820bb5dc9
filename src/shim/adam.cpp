// The optimizer step's kernels for training (src/train/kernels.rs): Keras-style Adam steps with the
// multi-tensor (_foreach_*) ops or PyTorch's fused kernel, dropping gradients, and the moving
// average's update. Compiled
// against the headers of the torch wheel that provides libtorch (see build.rs); plain C entry
// points for Rust.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <vector>

#include "shim.h"

using trainer_shim::copy_error;
using trainer_shim::list;

extern "C" {

// a = lerp(a, b, weight) for every pair, in multi-tensor kernels (the moving average of --ema).
int trainer_foreach_lerp(at::Tensor** a, at::Tensor** b, int n, double weight, char* err,
                         int errlen) {
  return trainer_shim::guarded(
      [&] {
        at::NoGradGuard no_grad;
        auto A = list(a, n), B = list(b, n);
        at::_foreach_lerp_(A, B, weight);
      },
      err, errlen);
}

// Drops each tensor's gradient (as PyTorch's zero_grad(set_to_none=True)): the next backward
// writes fresh gradients instead of adding into zeroed ones.
void trainer_grads_to_none(at::Tensor** params, int n) {
  for (int i = 0; i < n; ++i) params[i]->mutable_grad().reset();
}

// One Adam step as Keras computes it, over lists of tensors with multi-tensor kernels:
//   m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2; p -= lr_t m / (sqrt(v) + eps).
// Returns 0, or 1 with a message in err.
int trainer_foreach_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** m, at::Tensor** v, int n,
                         double beta1, double beta2, double eps, double lr_t, char* err, int errlen) {
  try {
    at::NoGradGuard no_grad;
    auto P = list(params, n), G = list(grads, n), M = list(m, n), V = list(v, n);
    at::_foreach_lerp_(M, G, 1.0 - beta1);
    at::_foreach_mul_(V, beta2);
    at::_foreach_addcmul_(V, G, G, 1.0 - beta2);
    auto denom = at::_foreach_sqrt(V);
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(P, M, denom, -lr_t);
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// PyTorch's fused Adam kernel (one launch for every parameter on CUDA). Each entry of `steps` is
// incremented first (as torch.optim.Adam does) and the kernel applies bias correction with it;
// with eps = eps_keras / sqrt(1 - beta2^t) its update is exactly Keras's.
int trainer_fused_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** m, at::Tensor** v,
                       at::Tensor** steps, int n, double lr, double beta1, double beta2, double eps,
                       char* err, int errlen) {
  try {
    at::NoGradGuard no_grad;
    auto P = list(params, n), G = list(grads, n), M = list(m, n), V = list(v, n), S = list(steps, n);
    std::vector<at::Tensor> none;
    at::_foreach_add_(S, 1.0);
    at::_fused_adam_(P, G, M, V, none, S, lr, beta1, beta2, 0.0, eps, false, false, std::nullopt,
                     std::nullopt);
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// Keras's Adam step with the step count, the learning rate and the step size as device tensors:
// `step` (a 0-dim double tensor) is incremented on the device and lr_t = lr sqrt(1 - beta2^t) /
// (1 - beta1^t) computed there from `lr` (likewise), so nothing is read from or frozen by the
// host (what a CUDA graph replays).
int trainer_foreach_adam_capturable(at::Tensor** params, at::Tensor** grads, at::Tensor** m,
                                    at::Tensor** v, int n, at::Tensor* step, at::Tensor* lr,
                                    double beta1, double beta2, double eps, char* err, int errlen) {
  try {
    at::NoGradGuard no_grad;
    auto P = list(params, n), G = list(grads, n), M = list(m, n), V = list(v, n);
    step->add_(1);
    auto lr_t = (*lr * at::sqrt(1 - at::pow(beta2, *step)) / (1 - at::pow(beta1, *step)))
                    .to(P.empty() ? at::kFloat : P[0].scalar_type());
    at::_foreach_lerp_(M, G, 1.0 - beta1);
    at::_foreach_mul_(V, beta2);
    at::_foreach_addcmul_(V, G, G, 1.0 - beta2);
    auto denom = at::_foreach_sqrt(V);
    at::_foreach_add_(denom, eps);
    auto update = at::_foreach_div(M, denom);
    at::_foreach_mul_(update, lr_t);
    at::_foreach_sub_(P, update);
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

}
