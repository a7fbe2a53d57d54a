// csrc/cuda/host_utils.h — host-side helpers shared by the CUDA op sources
// (elementwise.cu, conv_bn_act.cu); helpers only one of them uses stay in it.
//
// It holds:
//   * what argument checks put in their messages, which name the argument and
//     what was expected (like fastres/_checks.py): `dtype_name` (dtype_name.h) and
//     `describe` ("a 4-D float16 tensor of shape [2, 3, 4, 5] on cuda:0");
//   * layout rules mirroring fastres/_layout.py: `is_channels_last`;
//   * small integer helpers: `ceil_div`, `round_up`, `aligned16`;
//   * device attributes, cached per device: `device_attribute`,
//     `cached_attribute<attr>`, `sm_count`.
//
// Host code only (ATen, the CUDA runtime); the kernels' device helpers are in
// activations.cuh.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include "dtype_name.h"

namespace fastres {

// ---------------------------------------------------------------------------
// Argument messages.
// ---------------------------------------------------------------------------

// "a 4-D float16 tensor of shape [2, 3, 4, 5] on cuda:0"
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream os;
  os << "a " << t.dim() << "-D " << dtype_name(t.scalar_type());
  if (t.layout() != at::kStrided) os << " " << t.layout();
  os << " tensor of shape " << t.sizes() << " on " << t.device();
  return os.str();
}

// ---------------------------------------------------------------------------
// Layout (fastres/_layout.py).
// ---------------------------------------------------------------------------

// fastres/_layout.py is_channels_last: NHWC and not (also) NCHW-contiguous.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ---------------------------------------------------------------------------
// Integers and pointers.
// ---------------------------------------------------------------------------

// ceil(a / b) for a >= 0, b > 0.
inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The smallest multiple of m that is >= v, for v >= 0, m > 0.
inline int64_t round_up(int64_t v, int64_t m) {
  return ceil_div(v, m) * m;
}

// Whether `p` is 16-byte aligned (one 128-bit access).
inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// ---------------------------------------------------------------------------
// Device attributes.
// ---------------------------------------------------------------------------

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// A positive device attribute (at least 1), cached per device (the ops run
// under CUDA-graph capture too, where no call should be needed that is not).
template <cudaDeviceAttr kAttr>
int cached_attribute(int device) {
  static std::atomic<int> cache[64];  // zero-initialized (static storage)
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  const int value = std::max(device_attribute(kAttr, device), 1);
  if (device >= 0 && device < 64) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// The number of SMs of `device`.
inline int sm_count(int device) {
  return cached_attribute<cudaDevAttrMultiProcessorCount>(device);
}

}  // namespace fastres
