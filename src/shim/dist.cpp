// PyTorch's distributed engine (c10d) for `trainer fit` on several processes: TCPStore
// rendezvous, the Gloo process group, its collectives, and c10d::Reducer (DDP's gradient
// bucketing, which all-reduces buckets of gradients while backward runs). Compiled with
// USE_C10D_GLOO against the torch wheel's headers and gloo's (Debian's libgloo-dev); gloo's code
// itself is libtorch's. Plain C entry points for Rust; every C++ exception becomes an error
// string.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim.h"

using trainer_shim::copy_error;

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  std::chrono::milliseconds timeout;
};

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

bool is_loopback_addr(const sockaddr* a) {
  if (a->sa_family == AF_INET) {
    auto v4 = reinterpret_cast<const sockaddr_in*>(a);
    return (ntohl(v4->sin_addr.s_addr) >> 24) == 127;
  }
  if (a->sa_family == AF_INET6) {
    return IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(a)->sin6_addr);
  }
  return false;
}

// A socket bound to one of `host`'s addresses at `port` and listening, for rank 0's store to
// take over (TCPStoreOptions::masterListenFd; c10d itself would listen on every interface): the
// store is reachable only where MASTER_ADDR says, loopback alone for a job on this machine.
// -1 when `host` (not a loopback name) names no address of this machine, or names one only
// through loopback (a host name that /etc/hosts maps to 127.0.1.1): c10d's own choice then, as
// torchrun's. A loopback host that cannot be bound is an error.
int listen_on(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const bool local = is_loopback(host);
  if (getaddrinfo(host.c_str(), service.c_str(), &hints, &found) != 0 || found == nullptr) {
    if (local) throw std::runtime_error("cannot resolve " + host);
    return -1;
  }
  int fd = -1;
  int error = 0;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    if (is_loopback_addr(a->ai_addr) != local) continue;
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0) {
      error = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0 && local) {
    throw std::runtime_error("cannot listen on " + host + ":" + service + " for the rendezvous: " +
                             std::strerror(error));
  }
  return fd;
}

// One tensor per collective, contiguous, as Gloo wants; waits for completion.
int run(c10::intrusive_ptr<c10d::Work> work, char* err, int errlen) {
  return trainer_shim::guarded([&] { work->wait(); }, err, errlen);
}
}  // namespace

extern "C" {

// Whether this build has the NCCL process group.
int trainer_dist_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the job: the TCPStore at host:port (served by rank 0, listening only on host's address
// where it is one of this machine's: see listen_on), then a Gloo process group of
// `world` ranks, with NCCL for CUDA tensors when `cuda` is set and this build has it. `iface` (GLOO_SOCKET_IFNAME) picks the network interface; otherwise loopback for
// a local job, the host's own address for a multi-node one. Returns null with `err` on failure.
void* trainer_dist_init(const char* host, int port, int rank, int world, int timeout_s,
                        const char* iface, int cuda, char* err, int errlen) {
  try {
    auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s) * 1000);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    if (opts.isServer) {
      const int fd = listen_on(std::string(host), port);
      if (fd >= 0) opts.masterListenFd = fd;
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    const std::string h(host);
    if (iface != nullptr && iface[0] != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (is_loopback(h)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    if (cuda) {
#ifdef USE_C10D_NCCL
      // CUDA tensors go through NCCL, as torch.distributed's "cpu:gloo,cuda:nccl".
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, nccl_options);
      pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
      pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
#else
      // Without NCCL in this build, Gloo serves CUDA tensors too (through host copies).
      pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
#endif
    }
    return new Group{store, pg, timeout};
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return nullptr;
  }
}

void trainer_dist_free(void* group) { delete static_cast<Group*>(group); }

// t = sum over ranks of t, in place.
int trainer_dist_allreduce_sum(void* group, at::Tensor* t, char* err, int errlen) {
  try {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    return run(static_cast<Group*>(group)->pg->allreduce(ts, o), err, errlen);
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// t = rank `root`'s t, in place.
int trainer_dist_broadcast(void* group, at::Tensor* t, int root, char* err, int errlen) {
  try {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return run(static_cast<Group*>(group)->pg->broadcast(ts, o), err, errlen);
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

int trainer_dist_barrier(void* group, char* err, int errlen) {
  try {
    return run(static_cast<Group*>(group)->pg->barrier(), err, errlen);
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

// DDP's gradient engine over `params` (all of which get a gradient in every step), in buckets of
// at most `bucket_bytes` (the first 1 MiB, as DDP does), in reverse order of the parameters so
// the first buckets fill early in backward.
void* trainer_reducer_new(void* group, at::Tensor** params, int n, int64_t bucket_bytes,
                          char* err, int errlen) {
  try {
    std::vector<at::Tensor> ps;
    ps.reserve(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) ps.push_back(*params[i]);
    const int64_t first = 1024 * 1024;
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        ps, {static_cast<size_t>(first), static_cast<size_t>(bucket_bytes)},
        std::vector<bool>(ps.size(), false));
    std::reverse(buckets.begin(), buckets.end());
    (void)limits;
    return new c10d::Reducer(ps, buckets, static_cast<Group*>(group)->pg,
                             std::vector<bool>(ps.size(), false), bucket_bytes,
                             /*find_unused_parameters=*/false,
                             /*gradient_as_bucket_view=*/false, {}, first,
                             /*skip_all_reduce_unused_params=*/false,
                             /*use_python_reducer=*/false, {});
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return nullptr;
  }
}

// Before each backward pass: arms the reducer's autograd hooks for it.
int trainer_reducer_prepare(void* reducer, char* err, int errlen) {
  try {
    static_cast<c10d::Reducer*>(reducer)->prepare_for_backward({});
    return 0;
  } catch (const std::exception& e) {
    copy_error(e, err, errlen);
    return 1;
  }
}

void trainer_reducer_free(void* reducer) {
  try {
    delete static_cast<c10d::Reducer*>(reducer);
  } catch (...) {
  }
}
}
