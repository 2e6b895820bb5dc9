// libtorch's build configuration, for `trainer doctor` (src/doctor.rs). Compiled against the
// headers of the torch wheel that provides libtorch (see build.rs); a plain C entry point for Rust.
#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <cstring>
#include <string>

extern "C" {

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

}
