// What tch does not bind: autocast with a chosen dtype (bf16 or fp16) on CPU or CUDA, and the
// multi-tensor (_foreach_*) ops for a Keras-style Adam step. Compiled against the headers of the
// torch wheel that provides libtorch (see build.rs); plain C entry points for Rust.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/autocast_mode.h>
#include <torch/script.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : t == at::kBFloat16 ? 1 : 2; }

void copy_error(const std::exception& e, char* err, int len) {
  if (len > 0) {
    std::strncpy(err, e.what(), static_cast<size_t>(len - 1));
    err[len - 1] = '\0';
  }
}

std::vector<at::Tensor> list(at::Tensor** ptrs, int n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}
}  // namespace

extern "C" {

// Re-saves the TorchScript module at `in_path` to `out_path` with extra files (name -> content)
// that torch.jit.load(..., _extra_files=...) and torch::jit::load read back.
int trainer_jit_save_with_extra_files(const char* in_path, const char* out_path,
                                      const char** names, const char** contents, int n,
                                      char* err, int errlen) {
  try {
    auto module = torch::jit::load(in_path);
    torch::jit::ExtraFilesMap extra;
    for (int i = 0; i < n; ++i) extra[names[i]] = contents[i];
    module.save(out_path, extra);
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// libtorch's build configuration (at::show_config) into `out`, cut to `len` bytes; returns the
// full length.
int trainer_show_config(char* out, int len) {
  const std::string config = at::show_config();
  if (len > 0) {
    std::strncpy(out, config.c_str(), static_cast<size_t>(len - 1));
    out[len - 1] = '\0';
  }
  return static_cast<int>(config.size());
}

// Enters autocast on `device` (0 cpu, 1 cuda) with `dtype` (0 float16, 1 bfloat16). Returns the
// previous enabled state and writes the previous dtype, to give back to trainer_autocast_exit.
int trainer_autocast_enter(int device, int dtype, int* prev_dtype) {
  const auto dt = device_type(device);
  const bool prev = at::autocast::is_autocast_enabled(dt);
  *prev_dtype = dtype_code(at::autocast::get_autocast_dtype(dt));
  at::autocast::set_autocast_dtype(dt, dtype == 1 ? at::kBFloat16 : at::kHalf);
  at::autocast::set_autocast_enabled(dt, true);
  at::autocast::increment_nesting();
  return prev ? 1 : 0;
}

void trainer_autocast_exit(int device, int prev, int prev_dtype) {
  const auto dt = device_type(device);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  if (prev_dtype != 2) at::autocast::set_autocast_dtype(dt, prev_dtype == 1 ? at::kBFloat16 : at::kHalf);
  at::autocast::set_autocast_enabled(dt, prev != 0);
}

// Drops each tensor's gradient (as PyTorch's zero_grad(set_to_none=True)): the next backward
// writes fresh gradients instead of adding into zeroed ones.
void trainer_grads_to_none(at::Tensor** params, int n) {
  for (int i = 0; i < n; ++i) params[i]->mutable_grad().reset();
}

// Whether autocast is enabled on `device`, and its dtype code.
int trainer_autocast_state(int device, int* dtype) {
  const auto dt = device_type(device);
  *dtype = dtype_code(at::autocast::get_autocast_dtype(dt));
  return at::autocast::is_autocast_enabled(dt) ? 1 : 0;
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

// Keras's Adam step with the step count and the step size as device tensors: `step` (a 0-dim
// double tensor) is incremented on the device and lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)
// computed there, so nothing is read from or frozen by the host (what a CUDA graph replays).
int trainer_foreach_adam_capturable(at::Tensor** params, at::Tensor** grads, at::Tensor** m,
                                    at::Tensor** v, int n, at::Tensor* step, double lr,
                                    double beta1, double beta2, double eps, char* err, int errlen) {
  try {
    at::NoGradGuard no_grad;
    auto P = list(params, n), G = list(grads, n), M = list(m, n), V = list(v, n);
    step->add_(1);
    auto lr_t = (lr * at::sqrt(1 - at::pow(beta2, *step)) / (1 - at::pow(beta1, *step)))
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

// Multiplies every gradient by `inv_scale` and reports whether any holds inf or NaN, in one
// multi-tensor kernel (what GradScaler.unscale_ does). Writes 1 or 0 to `found`.
int trainer_unscale_and_check(at::Tensor** grads, int n, double inv_scale, int* found, char* err,
                              int errlen) {
  try {
    at::NoGradGuard no_grad;
    auto T = list(grads, n);
    *found = 0;
    if (T.empty()) return 0;
    const auto options = at::TensorOptions().dtype(at::kFloat).device(T[0].device());
    auto found_inf = at::zeros({1}, options);
    auto inv = at::full({1}, inv_scale, options);
    at::_amp_foreach_non_finite_check_and_unscale_(T, found_inf, inv);
    *found = found_inf.item<float>() != 0.0f ? 1 : 0;
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

}
