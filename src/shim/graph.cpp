// CUDA graphs of the training step (src/train/graph.rs): a graph with its own capture stream, the
// warm-up steps run on that stream, the capture (autocast's weight cache off, so every cast is
// recorded), and the replay. Compiled only when the torch wheel has CUDA and its headers (see
// build.rs); plain C entry points for Rust. Only libtorch's and c10's exported functions are
// called (no header-inline CUDA runtime call), so the binary needs no CUDA runtime of its own.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "shim.h"

using trainer_shim::copy_error;
using trainer_shim::guarded;

namespace {
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  c10::DeviceIndex device;
  // The stream that was current before enter, set until exit.
  std::optional<c10::cuda::CUDAStream> previous;
  bool cache_before = true;
  explicit Graph(c10::DeviceIndex d) : stream(c10::cuda::getStreamFromPool(false, d)), device(d) {}
};

Graph* of(void* g) { return static_cast<Graph*>(g); }

// Makes `to` wait for the work queued so far on `from`.
void wait(const c10::cuda::CUDAStream& from, const c10::cuda::CUDAStream& to) {
  c10::Event done(c10::DeviceType::CUDA);
  done.record(from.unwrap());
  done.block(to.unwrap());
}
}  // namespace

extern "C" {

// A graph for CUDA device `device`, or null with a message in err.
void* trainer_graph_new(int device, char* err, int errlen) {
  try {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    return new Graph(static_cast<c10::DeviceIndex>(device));
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return nullptr;
  }
}

void trainer_graph_free(void* g) { delete of(g); }

// Makes the graph's stream the current one, after the work queued on the previous one.
int trainer_graph_enter(void* g, char* err, int errlen) {
  return guarded(
      [&] {
        auto* G = of(g);
        if (G->previous) return;
        // The capture checks the current device's stream: make the training device current.
        c10::cuda::set_device(G->device);
        const auto current = c10::cuda::getCurrentCUDAStream(G->device);
        wait(current, G->stream);
        c10::cuda::setCurrentCUDAStream(G->stream);
        G->previous = current;
      },
      err, errlen);
}

// Gives the previous stream back, which then waits for the work queued on the graph's stream.
int trainer_graph_exit(void* g, char* err, int errlen) {
  return guarded(
      [&] {
        auto* G = of(g);
        if (!G->previous) return;
        const auto previous = *G->previous;
        G->previous.reset();
        c10::cuda::setCurrentCUDAStream(previous);
        wait(G->stream, previous);
      },
      err, errlen);
}

// Starts recording the work queued on the graph's stream (trainer_graph_enter first).
int trainer_graph_begin(void* g, char* err, int errlen) {
  return guarded(
      [&] {
        auto* G = of(g);
        c10::cuda::device_synchronize();
        // What the warm-up left cached goes back to the device before the graph takes its own
        // pool (as torch.cuda.graph does).
        c10::cuda::CUDACachingAllocator::emptyCache();
        G->cache_before = at::autocast::is_autocast_cache_enabled();
        at::autocast::set_autocast_cache_enabled(false);
        G->graph.capture_begin();
      },
      err, errlen);
}

// Ends the recording (also after a failed one, which it reports).
int trainer_graph_end(void* g, char* err, int errlen) {
  auto* G = of(g);
  const int rc = guarded([&] { G->graph.capture_end(); }, err, errlen);
  at::autocast::set_autocast_cache_enabled(G->cache_before);
  return rc;
}

// Runs the recorded work once, on the current stream.
int trainer_graph_replay(void* g, char* err, int errlen) {
  return guarded([&] { of(g)->graph.replay(); }, err, errlen);
}
}
