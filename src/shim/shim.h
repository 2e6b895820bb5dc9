// Helpers shared by the C++ shim's files (see build.rs): plain C entry points for Rust report a
// C++ exception's message into a caller's buffer and take tensor lists as arrays of pointers.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <vector>

namespace trainer_shim {
// Copies the exception's message into `err` (at most `len` bytes, NUL-terminated).
inline void copy_error(const std::exception& e, char* err, int len) {
  if (len > 0) {
    std::strncpy(err, e.what(), static_cast<size_t>(len - 1));
    err[len - 1] = '\0';
  }
}

// Runs `f`: 0, or 1 with the message of the exception it threw in `err`.
template <typename F>
int guarded(F f, char* err, int errlen) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// The `n` tensors behind `ptrs`, as a list for the multi-tensor (_foreach_*) ops.
inline std::vector<at::Tensor> list(at::Tensor** ptrs, int n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}
}  // namespace trainer_shim
