// csrc/cuda/elementwise.cu — the CUDA kernels of fastres's elementwise ops.
//
//   op (schema in csrc/bindings.cpp)                     computes (compute type, one rounding at the end)
//   ---------------------------------------------------  ------------------------------------------------
//   add_act_cuda(x, residual, act)                       y  = act(x + residual)
//   add_act_backward_cuda(grad, x, residual, act)        gz = grad * act'(x + residual)
//   bn_act_cuda(x, scale, shift, residual?, act)         y  = act(x * scale[c] + shift[c] (+ residual))
//   bn_act_backward_cuda(grad, x, scale, shift,          gz = grad * act'(z), z as in bn_act;
//       residual?, act, residual_grad, output)           (grad_x = gz * scale[c], grad_z = gz or empty,
//                                                         grad_scale[c] = sum_{n,h,w} gz * x,
//                                                         grad_shift[c] = sum_{n,h,w} gz,
//                                                         y = act(z) or empty)
//
// They replace `torch.relu(x + residual)` (the end of every ResNet block),
// `torch.relu(bn(x) (+ residual))` with an eval-mode BatchNorm folded into fp32
// (scale, shift) (fastres.ops.bn_scale_shift), and the autograd backward of both.
// fastres/reference.py is the ground truth; the epilogue (affine, residual,
// activation and its derivative) is activations.cuh's AffineEpilogue.
//
// Numerics: the compute type is float for float/half/bfloat16 and double for
// double; inputs are converted on load and every output is rounded once on
// store. `x * scale + shift (+ residual)` uses mul_rn/add_rn so it rounds after
// each op exactly like the reference's separate PyTorch ops (no FMA fusion).
//
// Layouts (fastres/_layout.py): a 4-D input is NCHW-contiguous or channels_last
// (NHWC) after `dense`; outputs are `empty_like` that input, and `residual` and
// `grad` are copied to its exact strides if theirs differ. The channel of flat
// memory offset i is `i % C` for NHWC and `(i / (H*W)) % C` for NCHW. An NCHW
// tensor with H*W == 1 is indexed as NHWC (same offsets). add_act is
// elementwise over memory and takes any rank.
//
// Determinism: the bn_act backward reductions write per-block partial sums
// (fixed partition, fixed in-block order) into a workspace from PyTorch's
// caching allocator, summed by at::sum; no floating-point atomics.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include <cuda_runtime.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activations.cuh"
#include "host_utils.h"

namespace fastres {
namespace {

// ===========================================================================
// Launch geometry constants.
// ===========================================================================

constexpr int kThreads = 256;           // threads per block, every kernel
constexpr int64_t kBlocksPerSm = 8;     // 8 x 256 threads = a full SM (2048 threads)
constexpr int64_t kElementwiseWaves = 4;  // grid-stride elementwise grids: this many full waves at most
constexpr int64_t kMaxGridX = 2147483647;  // CUDA limit on gridDim.x
constexpr int64_t kMaxGridY = 65535;       // CUDA limit on gridDim.y
// int32 indexing is used only below this many elements, so that no index, plus
// one grid/block stride, can overflow.
constexpr int64_t kInt32IndexLimit = int64_t(1) << 30;

// ===========================================================================
// Device helpers.
// ===========================================================================

template <typename T>
C10_HOST_DEVICE inline T min_of(T a, T b) {
  return a < b ? a : b;
}

// ===========================================================================
// add_act: y = act(x + residual)            (BACKWARD = false)
//          gz = grad * act'(x + residual)   (BACKWARD = true)
//
// Replaces `torch.relu(x + residual)` and, for the backward, autograd's
// `threshold_backward(grad, relu(x + residual), 0)` / `silu_backward`, which is
// the gradient of both x and residual.
//
// Elementwise over the n elements of memory (x, residual, grad and out share
// strides and are dense). VEC > 1: 128-bit accesses (all pointers 16-byte
// aligned), then a scalar tail of n % VEC elements. 64-bit indices;
// grid-stride loop, so any grid size is correct.
// ===========================================================================

template <typename scalar_t, Activation ACT, int VEC, bool BACKWARD>
__global__ void add_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                               const scalar_t* __restrict__ grad,  // BACKWARD only
                               scalar_t* __restrict__ out, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;

  auto compute = [](scalar_t xv, scalar_t rv, scalar_t gv) -> scalar_t {
    const acc_t z = add_rn(static_cast<acc_t>(xv), static_cast<acc_t>(rv));
    if constexpr (BACKWARD) {
      return static_cast<scalar_t>(act_backward<ACT>(z, static_cast<acc_t>(gv)));
    } else {
      return static_cast<scalar_t>(act_forward<ACT>(z));
    }
  };

  const int64_t n_vec = n / VEC;
  for (int64_t i = start; i < n_vec; i += step) {
    const int64_t off = i * VEC;
    const Vec<scalar_t, VEC> xv = load_vec<VEC>(x + off);
    const Vec<scalar_t, VEC> rv = load_vec<VEC>(residual + off);
    Vec<scalar_t, VEC> gv;
    if constexpr (BACKWARD) gv = load_vec<VEC>(grad + off);
    Vec<scalar_t, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.val[k] = compute(xv.val[k], rv.val[k], BACKWARD ? gv.val[k] : scalar_t(0));
    }
    store_vec<VEC>(out + off, ov);
  }
  if constexpr (VEC > 1) {
    for (int64_t i = n_vec * VEC + start; i < n; i += step) {
      out[i] = compute(x[i], residual[i], BACKWARD ? grad[i] : scalar_t(0));
    }
  }
}

// ===========================================================================
// bn_act forward: y = act(x * scale[c] + shift[c] (+ residual))
//
// Replaces `torch.relu(bn(x) + residual)` for an eval-mode BatchNorm given as
// fp32 scale/shift (fastres.reference.bn_act).
// ===========================================================================

// NHWC (and NCHW with H*W == 1): memory is rows x C, rows = N*H*W, channels
// innermost. Grid (channel blocks, row chunks), block (TX, TY): threadIdx.x
// along channels (VEC consecutive channels each, C % VEC == 0 when VEC > 1),
// threadIdx.y along the rows of this block's chunk. scale/shift are read once
// per thread. Channel blocks are grid-strided along x.
template <typename scalar_t, Activation ACT, int VEC>
__global__ void bn_act_nhwc_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
                                   const acc_type<scalar_t>* __restrict__ shift,
                                   const scalar_t* __restrict__ residual,  // nullable
                                   scalar_t* __restrict__ y, int64_t rows, int64_t C, int64_t rows_per_chunk) {
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min_of(rows, row_begin + rows_per_chunk);
  const int64_t block_channels = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t cb = blockIdx.x; cb * block_channels < C; cb += gridDim.x) {
    const int64_t c0 = cb * block_channels + static_cast<int64_t>(threadIdx.x) * VEC;
    if (c0 >= C) continue;
    const auto epilogue = AffineEpilogue<scalar_t, VEC>::channels(scale, shift, c0);
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      epilogue.template forward<ACT>(x, residual, y, row * C + c0);
    }
  }
}

// NCHW (H*W > 1): the M = N*H*W elements of channel c are j in [0, M) at
// offset (n * C + c) * HW + hw with n = j / HW, hw = j % HW. Work item
// (c, part) covers j in [part * chunk, (part + 1) * chunk); chunk and, when
// VEC > 1, HW are multiples of VEC, so a vector never leaves its (n, c) plane.
// Items are grid-strided; threads stride over j (coalesced within a plane).
template <typename scalar_t, Activation ACT, int VEC, typename index_t>
__global__ void bn_act_nchw_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
                                   const acc_type<scalar_t>* __restrict__ shift,
                                   const scalar_t* __restrict__ residual,  // nullable
                                   scalar_t* __restrict__ y, index_t C, index_t HW, index_t M, index_t chunk,
                                   index_t parts) {
  const index_t items = C * parts;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t c = item / parts;
    const index_t part = item - c * parts;
    const auto epilogue = AffineEpilogue<scalar_t, VEC>::channel(scale, shift, c);
    const index_t j_end = min_of(M, (part + 1) * chunk);
    for (index_t j = part * chunk + static_cast<index_t>(threadIdx.x) * VEC; j < j_end;
         j += static_cast<index_t>(blockDim.x) * VEC) {
      const index_t n = j / HW;
      epilogue.template forward<ACT>(x, residual, y, (n * C + c) * HW + (j - n * HW));
    }
  }
}

// ===========================================================================
// bn_act backward, one pass over grad/x(/residual):
//   z = x * scale[c] + shift[c] (+ residual)      (recomputed exactly as forward)
//   gz = grad * act'(z)
//   grad_x = gz * scale[c]                        (x dtype)
//   grad_z = gz                                   (x dtype; only if grad_z != nullptr)
//   partial_scale[p][c] = sum over this block's elements of gz * x
//   partial_shift[p][c] = sum over this block's elements of gz
// Replaces autograd through `act(x.float() * scale + shift (+ residual))`:
// silu_backward/threshold_backward, MulBackward and the sum_to_size reductions
// of the broadcast scale and shift.
// ===========================================================================

// NHWC geometry as bn_act_nhwc_kernel. Each thread accumulates its VEC
// channels over its rows in registers; the block then reduces over threadIdx.y
// in shared memory (a fixed tree) and row 0 writes partial[blockIdx.y][c].
// Dynamic shared memory: 2 * blockDim.x * blockDim.y * VEC acc_t; blockDim.y
// is a power of two.
template <typename scalar_t, Activation ACT, int VEC>
__global__ void bn_act_backward_nhwc_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
    const acc_type<scalar_t>* __restrict__ shift,
    const scalar_t* __restrict__ residual,  // nullable
    scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_z,  // nullable
    scalar_t* __restrict__ y_out,   // nullable: act(z), the recomputed forward output
    acc_type<scalar_t>* __restrict__ partial_scale, acc_type<scalar_t>* __restrict__ partial_shift, int64_t rows,
    int64_t C, int64_t rows_per_chunk) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh_scale = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x * VEC]
  acc_t* sh_shift = sh_scale + blockDim.x * blockDim.y * VEC;
  const int row_width = blockDim.x * VEC;
  const int slot = threadIdx.y * row_width + threadIdx.x * VEC;  // this thread's VEC slots

  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min_of(rows, row_begin + rows_per_chunk);
  const int64_t block_channels = static_cast<int64_t>(blockDim.x) * VEC;
  // The loop condition depends on blockIdx only: every thread runs the same
  // iterations and reaches the same __syncthreads.
  for (int64_t cb = blockIdx.x; cb * block_channels < C; cb += gridDim.x) {
    const int64_t c0 = cb * block_channels + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < C;
    acc_t sum_gzx[VEC], sum_gz[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum_gzx[k] = sum_gz[k] = acc_t(0);
    if (active) {
      const auto epilogue = AffineEpilogue<scalar_t, VEC>::channels(scale, shift, c0);
      for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
        acc_t xa[VEC], gz[VEC];
        epilogue.template backward<ACT>(grad, x, residual, grad_x, grad_z, y_out, row * C + c0, xa, gz);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sum_gz[k] += gz[k];
          sum_gzx[k] += gz[k] * xa[k];
        }
      }
    }
    // Reduce over threadIdx.y.
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sh_scale[slot + k] = sum_gzx[k];
      sh_shift[slot + k] = sum_gz[k];
    }
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
      if (static_cast<int>(threadIdx.y) < stride) {
        const int other = slot + stride * row_width;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sh_scale[slot + k] += sh_scale[other + k];
          sh_shift[slot + k] += sh_shift[other + k];
        }
      }
      __syncthreads();
    }
    if (threadIdx.y == 0 && active) {
      const int64_t p = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        partial_scale[p + k] = sh_scale[slot + k];
        partial_shift[p + k] = sh_shift[slot + k];
      }
    }
    __syncthreads();  // shared memory is rewritten by the next channel block
  }
}

// NCHW geometry as bn_act_nchw_kernel. Each work item (c, part) sums over its
// chunk of channel c; the block reduces in shared memory (a fixed tree over
// blockDim.x, a power of two) and thread 0 writes partial[part][c].
// Dynamic shared memory: 2 * blockDim.x acc_t.
template <typename scalar_t, Activation ACT, int VEC, typename index_t>
__global__ void bn_act_backward_nchw_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
    const acc_type<scalar_t>* __restrict__ shift,
    const scalar_t* __restrict__ residual,  // nullable
    scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_z,  // nullable
    scalar_t* __restrict__ y_out,   // nullable: act(z), the recomputed forward output
    acc_type<scalar_t>* __restrict__ partial_scale, acc_type<scalar_t>* __restrict__ partial_shift, index_t C,
    index_t HW, index_t M, index_t chunk, index_t parts) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh_scale = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.x]
  acc_t* sh_shift = sh_scale + blockDim.x;
  const int tid = threadIdx.x;

  const index_t items = C * parts;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform across the block
    const index_t c = item / parts;
    const index_t part = item - c * parts;
    const auto epilogue = AffineEpilogue<scalar_t, VEC>::channel(scale, shift, c);
    acc_t sum_gzx = acc_t(0), sum_gz = acc_t(0);
    const index_t j_end = min_of(M, (part + 1) * chunk);
    for (index_t j = part * chunk + static_cast<index_t>(tid) * VEC; j < j_end;
         j += static_cast<index_t>(blockDim.x) * VEC) {
      const index_t n = j / HW;
      acc_t xa[VEC], gz[VEC];
      epilogue.template backward<ACT>(grad, x, residual, grad_x, grad_z, y_out, (n * C + c) * HW + (j - n * HW), xa,
                                      gz);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sum_gz += gz[k];
        sum_gzx += gz[k] * xa[k];
      }
    }
    sh_scale[tid] = sum_gzx;
    sh_shift[tid] = sum_gz;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (tid < stride) {
        sh_scale[tid] += sh_scale[tid + stride];
        sh_shift[tid] += sh_shift[tid + stride];
      }
      __syncthreads();
    }
    if (tid == 0) {
      partial_scale[part * C + c] = sh_scale[0];
      partial_shift[part * C + c] = sh_shift[0];
    }
    __syncthreads();  // shared memory is rewritten by the next item
  }
}

// ===========================================================================
// Host side: argument checks (messages name the argument and what was
// expected, like fastres/_checks.py), layout normalization, launch geometry.
// The helpers shared with conv_bn_act.cu (describe, is_channels_last,
// ceil_div, sm_count, ...) are in host_utils.h.
// ===========================================================================

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// `t` is a strided CUDA tensor of a supported dtype (and rank `ndim` if >= 0).
void check_input(const char* op, const char* name, const at::Tensor& t, int64_t ndim = -1) {
  const bool ok = t.defined() && t.layout() == at::kStrided && t.is_cuda() && is_supported_dtype(t.scalar_type()) &&
                  (ndim < 0 || t.dim() == ndim);
  TORCH_CHECK_VALUE(ok, op, ": expected `", name, "` to be a ",
                    ndim == 4 ? "4-D (N, C, H, W) " : "",
                    "CUDA tensor of dtype float32, float16, bfloat16 or float64, got ", describe(t));
}

// `t` has exactly the shape, dtype and device of `x`.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const bool ok = t.defined() && t.layout() == at::kStrided && t.sizes() == x.sizes() &&
                  t.scalar_type() == x.scalar_type() && t.device() == x.device();
  TORCH_CHECK_VALUE(ok, op, ": expected `", name, "` to have the shape, dtype and device of `x` (",
                    describe(x), "), got ", describe(t));
}

// `t` is a 1-D float32 vector of length C on x's device (float32 or float64
// when x is float64: gradcheck).
void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t C = x.size(1);
  const bool is_double_x = x.scalar_type() == at::kDouble;
  const bool ok = t.defined() && t.layout() == at::kStrided && t.dim() == 1 && t.size(0) == C &&
                  (t.scalar_type() == at::kFloat || (is_double_x && t.scalar_type() == at::kDouble)) &&
                  t.device() == x.device();
  TORCH_CHECK_VALUE(ok, op, ": expected `", name, "` to be a 1-D ", is_double_x ? "float32 or float64" : "float32",
                    " tensor of length ", C, " (one value per channel of `x`) on ", x.device(), ", got ",
                    describe(t));
}

// fastres/_layout.py dense: `t` if NCHW- or NHWC-contiguous, else a copy in the
// suggested memory format.
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || is_channels_last(t)) return t;
  return t.contiguous(t.suggest_memory_format());
}

// fastres/_layout.py like: `t` with exactly `ref`'s strides, copying only if needed.
at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  return at::empty_like(ref).copy_(t);
}

bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

// The smallest power of two >= v, for v <= 2^30.
int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Calls f(std::integral_constant<int, VEC>{}) with VEC = 16 / sizeof(scalar_t)
// when `vectorize`, else VEC = 1.
template <typename scalar_t, typename F>
void dispatch_vec(bool vectorize, F&& f) {
  constexpr int kVec = max_vec_size<scalar_t>();
  if (vectorize) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(index_t{}) with index_t = int32_t when `small`, else int64_t.
template <typename F>
void dispatch_index(bool small, F&& f) {
  if (small) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The shape of a dense 4-D x as the kernels see it.
struct Layout {
  bool nhwc;     // rows x C, channels innermost (channels_last, or NCHW with H*W == 1)
  int64_t C;     // channels
  int64_t HW;    // H * W
  int64_t M;     // N * H * W: rows (NHWC) = elements per channel
};

Layout layout_of(const at::Tensor& x) {
  Layout L;
  L.C = x.size(1);
  L.HW = x.size(2) * x.size(3);
  L.M = x.size(0) * L.HW;
  L.nhwc = is_channels_last(x) || L.HW == 1;
  return L;
}

// 128-bit vectors need every pointer 16-byte aligned and a vector of VEC
// elements to stay within one channel run: C % VEC == 0 (NHWC: VEC
// consecutive channels) or H*W % VEC == 0 (NCHW: one channel per vector).
template <typename scalar_t>
bool can_vectorize(const Layout& L, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = max_vec_size<scalar_t>();
  return (L.nhwc ? L.C : L.HW) % kVec == 0 && all_aligned16(ptrs);
}

struct NhwcGeometry {
  dim3 grid, block;
  int64_t rows_per_chunk;
  int64_t row_chunks;  // = grid.y, the number of partial rows of the backward
};

NhwcGeometry nhwc_geometry(const Layout& L, int vec, int device) {
  const int64_t cols = ceil_div(L.C, vec);  // threads needed along the channels
  const int64_t tx = std::min<int64_t>(32, next_pow2(std::min<int64_t>(cols, 32)));
  const int64_t ty = kThreads / tx;
  const int64_t channel_blocks = ceil_div(cols, tx);
  const int64_t target_blocks = sm_count(device) * kBlocksPerSm;
  int64_t row_chunks = std::max<int64_t>(1, ceil_div(target_blocks, channel_blocks));
  row_chunks = std::min({row_chunks, ceil_div(L.M, ty), kMaxGridY});
  row_chunks = std::max<int64_t>(row_chunks, 1);
  NhwcGeometry g;
  g.rows_per_chunk = ceil_div(L.M, row_chunks);
  g.row_chunks = ceil_div(L.M, g.rows_per_chunk);  // no empty chunk
  g.grid = dim3(static_cast<unsigned>(std::min(channel_blocks, kMaxGridX)), static_cast<unsigned>(g.row_chunks));
  g.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  return g;
}

struct NchwGeometry {
  int64_t grid, threads;
  int64_t chunk;  // elements of a channel per work item, a multiple of vec
  int64_t parts;  // work items per channel, the number of partial rows of the backward
};

NchwGeometry nchw_geometry(const Layout& L, int vec, int device) {
  const int64_t target_blocks = sm_count(device) * kBlocksPerSm;
  int64_t parts = std::max<int64_t>(1, ceil_div(target_blocks, L.C));
  parts = std::min(parts, ceil_div(L.M, kThreads * vec));  // >= 1 since M >= 1
  NchwGeometry g;
  g.chunk = round_up(ceil_div(L.M, parts), vec);
  g.parts = ceil_div(L.M, g.chunk);  // no empty item
  g.threads = std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(ceil_div(g.chunk, vec))));
  g.grid = std::min(L.C * g.parts, kMaxGridX);
  return g;
}

// ---------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------

// out = act(x + residual), or out = grad * act'(x + residual) when grad is defined.
void launch_add_act(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& out,
                    Activation act) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = sm_count(x.get_device()) * kBlocksPerSm * kElementwiseWaves;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres::add_act_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vectorize = all_aligned16({xp, rp, gp, op});
    dispatch_activation(act, [&](auto act_c) {
      constexpr Activation ACT = decltype(act_c)::value;
      dispatch_vec<scalar_t>(vectorize, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const int64_t work = std::max<int64_t>(n / VEC, 1);
        const unsigned blocks = static_cast<unsigned>(std::min(ceil_div(work, kThreads), max_blocks));
        if (gp != nullptr) {
          add_act_kernel<scalar_t, ACT, VEC, true><<<blocks, kThreads, 0, stream>>>(xp, rp, gp, op, n);
        } else {
          add_act_kernel<scalar_t, ACT, VEC, false><<<blocks, kThreads, 0, stream>>>(xp, rp, nullptr, op, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void launch_bn_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& residual,
                   const at::Tensor& y, Activation act) {
  const Layout L = layout_of(x);
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres::bn_act_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool vectorize = can_vectorize<scalar_t>(L, {xp, rp, yp});
    dispatch_activation(act, [&](auto act_c) {
      constexpr Activation ACT = decltype(act_c)::value;
      dispatch_vec<scalar_t>(vectorize, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        if (L.nhwc) {
          const NhwcGeometry g = nhwc_geometry(L, VEC, device);
          bn_act_nhwc_kernel<scalar_t, ACT, VEC>
              <<<g.grid, g.block, 0, stream>>>(xp, sp, bp, rp, yp, L.M, L.C, g.rows_per_chunk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          const NchwGeometry g = nchw_geometry(L, VEC, device);
          dispatch_index(x.numel() < kInt32IndexLimit, [&](auto index_v) {
            using index_t = decltype(index_v);
            bn_act_nchw_kernel<scalar_t, ACT, VEC, index_t><<<static_cast<unsigned>(g.grid),
                                                              static_cast<unsigned>(g.threads), 0, stream>>>(
                xp, sp, bp, rp, yp, static_cast<index_t>(L.C), static_cast<index_t>(L.HW),
                static_cast<index_t>(L.M), static_cast<index_t>(g.chunk), static_cast<index_t>(g.parts));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
    });
  });
}

// Writes grad_x, grad_z and y (each if defined) and returns the (2, P, C)
// partial sums [sum gz * x, sum gz] in the compute type.
at::Tensor launch_bn_act_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& grad_x,
                                  const at::Tensor& grad_z, const at::Tensor& y, Activation act) {
  const Layout L = layout_of(x);
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres::bn_act_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gzp = grad_z.defined() ? grad_z.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.defined() ? y.data_ptr<scalar_t>() : nullptr;
    const bool vectorize = can_vectorize<scalar_t>(L, {gp, xp, rp, gxp, gzp, yp});
    const auto acc_options = x.options().dtype(acc_scalar_type(x.scalar_type()));
    dispatch_activation(act, [&](auto act_c) {
      constexpr Activation ACT = decltype(act_c)::value;
      dispatch_vec<scalar_t>(vectorize, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        if (L.nhwc) {
          const NhwcGeometry g = nhwc_geometry(L, VEC, device);
          partials = at::empty({2, g.row_chunks, L.C}, acc_options);
          acc_t* ps = partials.data_ptr<acc_t>();
          acc_t* pb = ps + g.row_chunks * L.C;
          const size_t smem = 2 * sizeof(acc_t) * g.block.x * g.block.y * VEC;
          bn_act_backward_nhwc_kernel<scalar_t, ACT, VEC><<<g.grid, g.block, smem, stream>>>(
              gp, xp, sp, bp, rp, gxp, gzp, yp, ps, pb, L.M, L.C, g.rows_per_chunk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          const NchwGeometry g = nchw_geometry(L, VEC, device);
          partials = at::empty({2, g.parts, L.C}, acc_options);
          acc_t* ps = partials.data_ptr<acc_t>();
          acc_t* pb = ps + g.parts * L.C;
          const size_t smem = 2 * sizeof(acc_t) * g.threads;
          dispatch_index(x.numel() < kInt32IndexLimit, [&](auto index_v) {
            using index_t = decltype(index_v);
            bn_act_backward_nchw_kernel<scalar_t, ACT, VEC, index_t>
                <<<static_cast<unsigned>(g.grid), static_cast<unsigned>(g.threads), smem, stream>>>(
                    gp, xp, sp, bp, rp, gxp, gzp, yp, ps, pb, static_cast<index_t>(L.C), static_cast<index_t>(L.HW),
                    static_cast<index_t>(L.M), static_cast<index_t>(g.chunk), static_cast<index_t>(g.parts));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
    });
  });
  return partials;
}

// scale/shift as contiguous vectors of the compute type (a no-op for the usual
// float32 vectors; float32 -> float64 is exact when x is float64).
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& x) {
  return v.to(acc_scalar_type(x.scalar_type())).contiguous();
}

// ===========================================================================
// The ops.
// ===========================================================================

at::Tensor add_act_cuda(const at::Tensor& x_in, const at::Tensor& residual_in, c10::string_view activation) {
  constexpr const char* op = "add_act_cuda";
  check_input(op, "x", x_in);
  check_like(op, "residual", residual_in, x_in);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor residual = like(residual_in, x);
  at::Tensor y = at::empty_like(x);
  launch_add_act(x, residual, at::Tensor(), y, act);
  return y;
}

at::Tensor add_act_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& residual_in,
                                 c10::string_view activation) {
  constexpr const char* op = "add_act_backward_cuda";
  check_input(op, "x", x_in);
  check_like(op, "grad", grad_in, x_in);
  check_like(op, "residual", residual_in, x_in);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor residual = like(residual_in, x);
  const at::Tensor grad = like(grad_in, x);
  at::Tensor grad_z = at::empty_like(x);
  launch_add_act(x, residual, grad, grad_z, act);
  return grad_z;
}

at::Tensor bn_act_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& residual_in, c10::string_view activation) {
  constexpr const char* op = "bn_act_cuda";
  check_input(op, "x", x_in, 4);
  check_channel_vector(op, "scale", scale, x_in);
  check_channel_vector(op, "shift", shift, x_in);
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  if (has_residual) check_like(op, "residual", *residual_in, x_in);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor residual = has_residual ? like(*residual_in, x) : at::Tensor();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  launch_bn_act(x, channel_vector(scale, x), channel_vector(shift, x), residual, y, act);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual_in, c10::string_view activation, bool residual_grad, bool output) {
  constexpr const char* op = "bn_act_backward_cuda";
  check_input(op, "x", x_in, 4);
  check_like(op, "grad", grad_in, x_in);
  check_channel_vector(op, "scale", scale, x_in);
  check_channel_vector(op, "shift", shift, x_in);
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  if (has_residual) check_like(op, "residual", *residual_in, x_in);
  const Activation act = parse_activation(activation, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad = like(grad_in, x);
  const at::Tensor residual = has_residual ? like(*residual_in, x) : at::Tensor();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_z = residual_grad ? at::empty_like(x) : x.new_empty({0});
  at::Tensor y = output ? at::empty_like(x) : x.new_empty({0});
  at::Tensor grad_scale = at::empty_like(scale);
  at::Tensor grad_shift = at::empty_like(shift);
  if (x.numel() == 0) {
    grad_scale.zero_();
    grad_shift.zero_();
    return {grad_x, grad_z, grad_scale, grad_shift, y};
  }
  const at::Tensor partials =
      launch_bn_act_backward(grad, x, channel_vector(scale, x), channel_vector(shift, x), residual, grad_x,
                             residual_grad ? grad_z : at::Tensor(), output ? y : at::Tensor(), act);
  // Final deterministic reduction over the P partial rows: (2, P, C) -> (2, C).
  const at::Tensor sums = partials.sum(at::IntArrayRef{1});
  grad_scale.copy_(sums[0]);
  grad_shift.copy_(sums[1]);
  return {grad_x, grad_z, grad_scale, grad_shift, y};
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("add_act_cuda", &fastres::add_act_cuda);
  m.impl("add_act_backward_cuda", &fastres::add_act_backward_cuda);
  m.impl("bn_act_cuda", &fastres::bn_act_cuda);
  m.impl("bn_act_backward_cuda", &fastres::bn_act_backward_cuda);
}
