// Mixed precision (AMP): what tch does not bind, autocast with a chosen dtype (bf16 or fp16) on
// CPU or CUDA (src/model/precision.rs) and the unscaling of fp16 gradients with their inf/NaN
// check (src/train/kernels.rs). Compiled against the headers of the torch wheel that provides
// libtorch (see build.rs); plain C entry points for Rust.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/autocast_mode.h>

#include "shim.h"

using trainer_shim::copy_error;
using trainer_shim::list;

namespace {
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : t == at::kBFloat16 ? 1 : 2; }
}  // namespace

extern "C" {

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

// Whether autocast is enabled on `device`, and its dtype code.
int trainer_autocast_state(int device, int* dtype) {
  const auto dt = device_type(device);
  *dtype = dtype_code(at::autocast::get_autocast_dtype(dt));
  return at::autocast::is_autocast_enabled(dt) ? 1 : 0;
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
