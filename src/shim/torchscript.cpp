// TorchScript saving for `trainer export` (src/model/torchscript.rs): what tch does not bind,
// writing a module with extra files. Compiled against the headers of the torch wheel that
// provides libtorch (see build.rs); plain C entry points for Rust.
#include <torch/script.h>

#include "shim.h"

using trainer_shim::copy_error;

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

}
