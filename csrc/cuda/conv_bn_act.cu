// csrc/cuda/conv_bn_act.cu — host side of the fused conv-BN-activation op.
//
//   op (schema in csrc/bindings.cpp)                            computes
//   ----------------------------------------------------------  -------------------------------------------------
//   conv_bn_act_cuda(x, weight, scale, shift, residual?,        y = act(conv2d(x, weight, stride, padding, dilation,
//       stride, padding, dilation, groups, activation)                 groups) * scale[k] + shift[k] (+ residual))
//   _conv_bn_act_cuda_unsupported(dtype, C, H, W, K, R, S,     "" if conv_bn_act_cuda runs such a conv on a GPU of
//       stride, padding, dilation, groups, sm_major)             compute capability sm_major.x, else why not
//   _conv_bn_act_cuda_kernel(dtype, N, C, H, W, K, R, S,       the kernel conv_bn_act_cuda runs it with there
//       stride, padding, dilation, groups, sm_major, sms)        ("sm90 128x128x64", "sm80 128x64x32", ...)
//   _conv_bn_act_cuda_sm90_unsupported(same as _unsupported)   "" if the Hopper kernels take it, else why not
//   _conv_bn_act_cuda_sm90_plan(dtype, tile, N, C, H, W, K,    what CUTLASS would run for it (host arithmetic only)
//       R, S, stride, padding, dilation)
//   _conv_bn_act_cuda_kernels()                                 the compiled kernels' names
//
// It replaces `relu(bn(conv(x)) (+ residual))` with an eval-mode BatchNorm
// folded into fp32 (scale, shift) (fastres.ops.bn_scale_shift); the truth is
// fastres.reference.conv_bn_act. The convolution runs as a CUTLASS tensor-core
// implicit GEMM whose epilogue applies scale, shift, residual and activation to
// the fp32 accumulator before the single rounding to the output dtype: on
// Hopper, a CUTLASS 3.x sm90 kernel (TMA, WGMMA; conv_bn_act_sm90.cuh) for the
// shapes it takes, else a CUTLASS 2.x Sm80 kernel (conv_bn_act.cuh); one rule
// picks (choose_kernel; design and routing: docs/cuda_conv.md).
//
// This file: argument checks (messages name the argument and what was
// expected), the shapes the kernels support, NCHW <-> NHWC and channel padding,
// the tile heuristic, batch chunking under CUTLASS's 2^31-byte tensor limit,
// and the launches (conv_bn_act_kernels_*.cu) on the current stream.
//
// Layouts: the kernels compute NHWC x [N, H, W, C], KRSC weight [K, R, S, C/g],
// NHWC residual and output [N, P, Q, K], all dense and 16-byte aligned.
//   * x: used in place when channels_last (and aligned); an NCHW x is copied
//     to NHWC once (one read + one write of x).
//   * weight: permuted to KRSC (free if channels_last; small otherwise).
//   * residual: used in place when channels_last, else copied to NHWC.
//   * output: F.conv2d's memory format (fastres/_layout.py
//     conv_out_channels_last: channels_last if x or weight is). The kernel
//     writes NHWC; an NCHW output costs one more copy.
//   * channel padding (groups == 1): C is zero-padded to the kernels'
//     alignment (16-bit: C <= 4 -> 4 for the fixed-channels stem kernel, else a
//     multiple of 8; fp32: a multiple of 4) and K likewise (zero filter rows,
//     zero scale/shift, the padded columns dropped by one copy). ResNets need
//     it only for the 3-channel stem, whose NCHW->NHWC copy does the padding.
#define FASTRES_CONV_INTERFACE_ONLY
#include "conv_bn_act.cuh"
#undef FASTRES_CONV_INTERFACE_ONLY

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/SymInt.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activations.cuh"
#include "host_utils.h"

namespace fastres {
namespace {

using conv::ConvDtype;
using conv::ConvLaunchResult;
using conv::ConvProblem;
using conv::ConvTile;
using conv::Sm90Tile;

constexpr const char* kOp = "conv_bn_act_cuda";

// CUTLASS's device-level limit: each of x, weight and output below 2^31 bytes
// per launch (cutlass::conv::device::ImplicitGemmConvolution::can_implement).
constexpr int64_t kMaxTensorBytes = (int64_t(1) << 31) - 1;

// ===========================================================================
// Small host helpers (the ones shared with elementwise.cu: host_utils.h).
// ===========================================================================

// The compute capability major of `device` (cached, host_utils.h).
int device_major(int device) {
  return cached_attribute<cudaDevAttrComputeCapabilityMajor>(device);
}

// ===========================================================================
// What the kernels support (the one place these rules live: the op checks
// them, and fastres._extension.cuda_conv_unsupported_reason asks them through
// _conv_bn_act_cuda_unsupported to route backend=None elsewhere).
// ===========================================================================

// The channel alignment of the mainloop/epilogue accesses (128 bits).
int64_t channel_alignment(at::ScalarType dtype) {
  return dtype == at::kFloat ? 4 : 8;
}

// The reduction depth (ThreadblockShape::kK) of the optimized kernels: a
// group's channels must fill whole k-tiles, so that no tile reads into the
// next group's channels (CUTLASS's kSingleGroup masks only the filter there,
// and Inf * 0 would poison the sum).
int64_t group_channel_multiple(at::ScalarType dtype) {
  return dtype == at::kFloat ? 16 : 32;
}

// The narrowest ThreadblockShape::kN available for grouped convolutions
// (kSingleGroup: one threadblock's columns inside one group).
int64_t group_min_tile_n(at::ScalarType dtype) {
  return dtype == at::kFloat ? 64 : 32;
}

// The output size along one dimension, PyTorch's formula (floor division, as
// at::native's conv_output_size and fastres/_layout.py conv_out_size): 0 when
// the dilated window does not fit, which the op rejects. (Truncating division
// gave 1 for H=3, R=4, stride 2: a window starting past the input.)
int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// One convolution's geometry, as both the op and the routing rule see it.
struct ConvGeometry {
  at::ScalarType dtype;
  int64_t C, H, W, K, R, S, groups;
  int64_t stride[2], padding[2], dilation[2];
  int64_t P() const { return conv_out_size(H, R, stride[0], padding[0], dilation[0]); }
  int64_t Q() const { return conv_out_size(W, S, stride[1], padding[1], dilation[1]); }
  // The fixed-channels stem kernel: 16-bit, C <= 4, padded to 4 channels.
  bool stem() const { return dtype != at::kFloat && groups == 1 && C <= 4; }
  // Channels as the kernels see them: padded to the alignment when groups == 1
  // (grouped shapes are aligned, see unsupported_reason).
  int64_t c_pad() const {
    const int64_t align = channel_alignment(dtype);
    return groups > 1 ? C : (stem() ? 4 : std::max(round_up(C, align), align));
  }
  int64_t k_pad() const { return groups > 1 ? K : round_up(K, channel_alignment(dtype)); }
};

// The kernels' problem for `n` images of `g` with `c` input and `k` output
// channels (the padded counts); the caller sets the pointers, the vectors and
// the activation. Every extent fits an int (unsupported_reason).
ConvProblem problem(const ConvGeometry& g, int64_t n, int64_t c, int64_t k) {
  ConvProblem p{};
  p.N = static_cast<int>(n);
  p.H = static_cast<int>(g.H);
  p.W = static_cast<int>(g.W);
  p.C = static_cast<int>(c);
  p.K = static_cast<int>(k);
  p.R = static_cast<int>(g.R);
  p.S = static_cast<int>(g.S);
  p.P = static_cast<int>(g.P());
  p.Q = static_cast<int>(g.Q());
  p.pad_h = static_cast<int>(g.padding[0]);
  p.pad_w = static_cast<int>(g.padding[1]);
  p.stride_h = static_cast<int>(g.stride[0]);
  p.stride_w = static_cast<int>(g.stride[1]);
  p.dil_h = static_cast<int>(g.dilation[0]);
  p.dil_w = static_cast<int>(g.dilation[1]);
  p.groups = static_cast<int>(g.groups);
  return p;
}

// "" if conv_bn_act_cuda runs the convolution `g` on a device of compute
// capability `major`.x, else why not (and where to go). The one rule: the op
// checks it, and backend=None routing asks it (fastres._extension.
// cuda_conv_unsupported_reason, through _conv_bn_act_cuda_unsupported), so a
// conv the kernels cannot take goes to another backend instead of raising.
// N and the memory formats do not matter: batches are chunked under CUTLASS's
// 2^31-byte tensor limit, so one image is what must fit.
std::string unsupported_reason(const ConvGeometry& g, int major) {
  std::ostringstream os;
  const at::ScalarType dtype = g.dtype;
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (major < 8) {
    os << "the CUDA conv kernels are Sm80 tensor-core kernels (cp.async, mma.sync) and need compute "
          "capability 8.0 or newer (Ampere, Ada, Hopper); this GPU has "
       << major << ".x";
  } else if (dtype == at::kDouble) {
    os << "float64 has no tensor-core kernel here (float16, bfloat16, and float32 as TF32 do)";
  } else if (dtype == at::kFloat && !at::globalContext().allowTF32CuDNN()) {
    os << "float32 runs on TF32 tensor cores, which torch.backends.cudnn.allow_tf32 = False forbids "
          "(the kernels never lower precision silently); set it to True, or use float16/bfloat16";
  } else if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) {
    os << "dtype " << dtype_name(dtype) << " is not supported (float16, bfloat16, float32)";
  } else if (g.R > 32 || g.S > 32) {
    os << "a " << g.R << "x" << g.S << " window exceeds the 32x32 the optimized CUTLASS iterators' filter-position "
          "masks hold";
  } else if (g.groups > 1 && ((g.C / g.groups) % group_channel_multiple(dtype) != 0 ||
                              (g.K / g.groups) % group_min_tile_n(dtype) != 0)) {
    os << "grouped convolution with " << g.C / g.groups << " input and " << g.K / g.groups
       << " output channels per group (groups=" << g.groups << ") is not implemented for " << dtype_name(dtype)
       << ": the kernels need C/groups % " << group_channel_multiple(dtype) << " == 0 and K/groups % "
       << group_min_tile_n(dtype) << " == 0 (one threadblock tile inside one group, CUTLASS GroupMode::kSingleGroup)";
  } else if (g.H + 2 * g.padding[0] > kInt32Max || g.W + 2 * g.padding[1] > kInt32Max ||
             std::max({g.stride[0], g.stride[1], g.dilation[0], g.dilation[1]}) > kInt32Max) {
    // CUTLASS's iterators compute input rows/columns h = p*stride - pad + r*dilation
    // in int32 (ConvProblem holds ints); p*stride + r*dilation <= H + 2*pad - 1 for
    // every output/filter position r < R, so these bounds keep all of it exact
    // (the stem's positions past the window are bounds-checked on the final h
    // and meet zero weights, see docs/cuda_conv.md).
    os << "padding [" << g.padding[0] << ", " << g.padding[1] << "], stride [" << g.stride[0] << ", "
       << g.stride[1] << "] and dilation [" << g.dilation[0] << ", " << g.dilation[1]
       << "] overflow the kernels' 32-bit coordinates";
  } else {
    const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
    const int64_t filter = g.k_pad() * g.R * g.S * (g.c_pad() / g.groups) * elem;
    const int64_t image_in = g.H * g.W * g.c_pad() * elem, image_out = g.P() * g.Q() * g.k_pad() * elem;
    if (filter > kMaxTensorBytes || image_in > kMaxTensorBytes || image_out > kMaxTensorBytes) {
      os << "the weight (" << filter << " bytes), one input image (" << image_in << " bytes) and one output image ("
         << image_out << " bytes) must each stay below 2^31 bytes (CUTLASS's 32-bit tensor offsets)";
    }
  }
  std::string reason = os.str();
  if (!reason.empty()) reason += "; backend='triton' or backend='torch' runs it";
  return reason;
}

// ===========================================================================
// Tile selection (docs/cuda_conv.md, "Tile heuristic").
// ===========================================================================

struct TileShape {
  ConvTile tile;
  const char* name;
  int64_t m, n, warps;
};

const TileShape kTf32Tile{ConvTile::kTf32, "tf32", 128, 64, 4};
const TileShape k16BitTiles[] = {
    {ConvTile::k128x128, "128x128", 128, 128, 4},
    {ConvTile::k128x64, "128x64", 128, 64, 4},
    {ConvTile::k64x64, "64x64", 64, 64, 4},
    {ConvTile::k128x32, "128x32", 128, 32, 2},
};

// The threadblock tile of an M x K implicit GEMM (M = N*P*Q output pixels, K
// output channels) on a GPU with `sms` SMs:
//   1. candidates, largest first: 128x128, 128x64, 64x64, 128x32 (16-bit; fp32
//      has one TF32 tile); a grouped conv keeps those whose N divides K/groups
//      (kSingleGroup), a dense one prefers those whose N divides K (no idle
//      columns) when there are any;
//   2. the first (largest) one that fills a wave (CTAs >= SMs) wins: it
//      reuses each loaded operand the most;
//   3. else (no tile fills the GPU, so time = one CTA's mainloop) the one whose
//      CTA finishes first: least tile area per warp (up to the 4 tensor-core
//      sub-partitions of an SM), i.e. 64x64; ties go to the larger tile.
// $FASTRES_CUDA_CONV_TILE (128x128, 128x64, 64x64 or 128x32) forces a 16-bit
// tile (tests and compute-sanitizer runs cover every kernel with it). The stem
// kernel (C <= 4) is chosen before this, by channel count.
TileShape choose_tile(ConvDtype dtype, int64_t M, int64_t K, int64_t groups, int sms) {
  if (dtype == ConvDtype::kF32) return kTf32Tile;
  const int64_t kg = K / groups;
  const char* forced = std::getenv("FASTRES_CUDA_CONV_TILE");
  if (forced != nullptr && *forced != '\0') {
    for (const TileShape& t : k16BitTiles) {
      if (std::string(forced) != t.name) continue;
      TORCH_CHECK_VALUE(groups == 1 || kg % t.n == 0, kOp, ": FASTRES_CUDA_CONV_TILE=", forced,
                        " cannot run a grouped conv with K/groups=", kg, " (needs a multiple of ", t.n, ")");
      return t;
    }
    TORCH_CHECK_VALUE(false, kOp, ": FASTRES_CUDA_CONV_TILE=", forced,
                      " is not a tile; expected one of 128x128, 128x64, 64x64, 128x32, sm90-128x128, sm90-128x64");
  }
  std::vector<TileShape> fit;
  for (const TileShape& t : k16BitTiles) {
    if (groups > 1 ? kg % t.n == 0 : K % t.n == 0) fit.push_back(t);
  }
  if (fit.empty()) {
    TORCH_CHECK(groups == 1, kOp, ": internal error: no tile for a grouped conv that unsupported_reason accepted");
    fit.assign(std::begin(k16BitTiles), std::end(k16BitTiles));
  }
  auto ctas = [&](const TileShape& t) { return ceil_div(M, t.m) * ceil_div(K, t.n); };
  for (const TileShape& t : fit) {
    if (ctas(t) >= sms) return t;
  }
  auto cta_time = [](const TileShape& t) { return t.m * t.n / std::min<int64_t>(t.warps, 4); };
  TileShape best = fit.front();
  for (const TileShape& t : fit) {
    if (cta_time(t) < cta_time(best)) best = t;
  }
  return best;
}

const char* tile_name(ConvTile tile) {
  switch (tile) {
    case ConvTile::k128x128:
      return "128x128x32";
    case ConvTile::k128x64:
      return "128x64x32";
    case ConvTile::k64x64:
      return "64x64x32";
    case ConvTile::k128x32:
      return "128x32x32";
    case ConvTile::kStem:
      return "stem 128x64x32 (fixed 4 channels)";
    case ConvTile::kTf32:
      return "tf32 128x64x16";
  }
  return "?";
}

// ===========================================================================
// The Hopper kernels: which shapes they take, and the one choice of kernel.
// ===========================================================================

#ifdef FASTRES_WITH_SM90
constexpr bool kSm90Built = true;
#else
constexpr bool kSm90Built = false;
#endif

// "" if the sm90 kernels (conv_bn_act_sm90.cuh) run `g` on a device of compute
// capability `major`.x, else why not; `g` must already pass unsupported_reason.
// The limits are those of CUTLASS's sm90 conv collective (can_implement): TMA's
// 16-byte alignment of every channel row, im2col TMA's 8-bit signed corners
// and 8-bit filter offsets for 2-D convolutions, and no groups.
std::string sm90_unsupported_reason(const ConvGeometry& g, int major) {
  std::ostringstream os;
  const int64_t corner_hi[2] = {g.padding[0] - (g.R - 1) * g.dilation[0], g.padding[1] - (g.S - 1) * g.dilation[1]};
  if (!kSm90Built) {
    os << "fastres._C was built without the sm_90a kernels (TORCH_CUDA_ARCH_LIST had no 9.0 or 9.0a entry)";
  } else if (major != 9) {
    os << "the sm90 kernels (TMA, WGMMA: sm_90a) run only on compute capability 9.x; this GPU has " << major << ".x";
  } else if (g.dtype != at::kHalf && g.dtype != at::kBFloat16) {
    os << dtype_name(g.dtype) << " runs on the Sm80 TF32 kernel (the sm90 kernels are float16/bfloat16)";
  } else if (g.groups > 1) {
    os << "CUTLASS's sm90 conv collective has no grouped convolution (groups=" << g.groups << ")";
  } else if (g.C <= 4) {
    os << "the stem (C=" << g.C << ") runs on the Sm80 fixed-channels kernel, which packs 8 filter positions of 4 "
          "channels into one 32-deep k-tile; the sm90 mainloop reduces one filter position per 64-channel k-tile "
          "(a 7x7 stem: 49 k-tiles of 64 against 7 of 32, 14x the MMAs)";
  } else if (g.C % 8 != 0 || g.K % 8 != 0) {
    os << "TMA needs 16-byte channel rows: C and K multiples of 8, got C=" << g.C << ", K=" << g.K;
  } else if (std::max(g.padding[0], g.padding[1]) > 128 || std::min(corner_hi[0], corner_hi[1]) < -128 ||
             std::max(corner_hi[0], corner_hi[1]) > 127 || (g.R - 1) * g.dilation[0] > 254 ||
             (g.S - 1) * g.dilation[1] > 254) {
    os << "im2col TMA holds 2-D corners in [-128, 127] and filter offsets below 255: padding [" << g.padding[0]
       << ", " << g.padding[1] << "] with a " << g.R << "x" << g.S << " window dilated [" << g.dilation[0] << ", "
       << g.dilation[1] << "] is outside";
  } else if (g.stride[0] > 8 || g.stride[1] > 8) {
    os << "im2col TMA traverses with strides of at most 8, got [" << g.stride[0] << ", " << g.stride[1] << "]";
  }
  return os.str();
}

struct Sm90TileShape {
  Sm90Tile tile;
  const char* name;
  int64_t m, n;
};
const Sm90TileShape kSm90Tiles[] = {
    {Sm90Tile::k128x128, "sm90-128x128", 128, 128},
    {Sm90Tile::k128x64, "sm90-128x64", 128, 64},
};

// The kernel of one launch: an sm90 tile or an Sm80 ConvTile.
struct KernelChoice {
  bool sm90 = false;
  Sm90Tile sm90_tile = Sm90Tile::k128x128;
  ConvTile tile = ConvTile::k128x128;
  std::string name() const {
    if (sm90) return std::string("sm90 ") + (sm90_tile == Sm90Tile::k128x128 ? "128x128x64" : "128x64x64") +
                     " cluster 2x1x1";
    return std::string("sm80 ") + tile_name(tile);
  }
};

// The one choice of kernel for `g` with M = N*P*Q output pixels on a GPU of
// compute capability `major`.x with `sms` SMs (g passes unsupported_reason):
//   1. the sm90 kernels when sm90_unsupported_reason(g) is "": 128x128 when K
//      is a multiple of 128 and its CTAs fill a wave, else 128x64 (K = 64
//      layers; twice the CTAs where 128x128 would leave SMs idle);
//   2. else the Sm80 kernels: the stem kernel for C <= 4, else choose_tile.
// $FASTRES_CUDA_CONV_TILE forces a tile: sm90-128x128 or sm90-128x64 (an
// sm90 shape on an sm90 GPU), or an Sm80 tile (128x128, 128x64, 64x64,
// 128x32), which also keeps a Hopper GPU on the Sm80 kernels.
KernelChoice choose_kernel(const ConvGeometry& g, int64_t M, int major, int sms) {
  KernelChoice choice;
  const char* forced_env = std::getenv("FASTRES_CUDA_CONV_TILE");
  const std::string forced = forced_env == nullptr ? "" : forced_env;
  const bool force_sm80 = !forced.empty() && forced.rfind("sm90-", 0) != 0;
  const std::string sm90_reason = sm90_unsupported_reason(g, major);
  if (!force_sm80 && sm90_reason.empty()) {
    choice.sm90 = true;
    if (!forced.empty()) {
      for (const Sm90TileShape& t : kSm90Tiles) {
        if (forced == t.name) {
          choice.sm90_tile = t.tile;
          return choice;
        }
      }
      TORCH_CHECK_VALUE(false, kOp, ": FASTRES_CUDA_CONV_TILE=", forced, " is not a tile; expected one of "
                        "sm90-128x128, sm90-128x64, 128x128, 128x64, 64x64, 128x32");
    }
    const int64_t wide_ctas = ceil_div(M, 128) * ceil_div(g.K, 128);
    choice.sm90_tile = g.K % 128 == 0 && wide_ctas >= sms ? Sm90Tile::k128x128 : Sm90Tile::k128x64;
    return choice;
  }
  TORCH_CHECK_VALUE(force_sm80 || forced.empty(), kOp, ": FASTRES_CUDA_CONV_TILE=", forced,
                    " forces an sm90 tile, which cannot run this conv: ", sm90_reason);
  const ConvDtype kdtype = g.dtype == at::kHalf       ? ConvDtype::kF16
                           : g.dtype == at::kBFloat16 ? ConvDtype::kBF16
                                                      : ConvDtype::kF32;
  choice.tile = g.stem() ? ConvTile::kStem : choose_tile(kdtype, M, g.k_pad(), g.groups, sms).tile;
  return choice;
}

// ===========================================================================
// Operand preparation.
// ===========================================================================

// `t` (N, C, H, W) as a dense NHWC tensor with `channels` (>= C) channels,
// zero-padded, 16-byte aligned: `t` itself when possible.
at::Tensor nhwc(const at::Tensor& t, int64_t channels) {
  if (channels == t.size(1)) {
    at::Tensor out = t.contiguous(at::MemoryFormat::ChannelsLast);
    if (!aligned16(out.const_data_ptr())) out = out.clone(at::MemoryFormat::ChannelsLast);
    return out;
  }
  at::Tensor out = at::zeros({t.size(0), channels, t.size(2), t.size(3)},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// weight (K, C/g, R, S) as dense KRSC [k_pad, R, S, c_pad], zero-padded.
at::Tensor krsc(const at::Tensor& w, int64_t k_pad, int64_t c_pad) {
  const at::Tensor permuted = w.permute({0, 2, 3, 1});
  if (k_pad == w.size(0) && c_pad == w.size(1)) {
    at::Tensor out = permuted.contiguous();
    if (!aligned16(out.const_data_ptr())) out = out.clone();
    return out;
  }
  at::Tensor out = at::zeros({k_pad, w.size(2), w.size(3), c_pad}, w.options());
  out.narrow(0, 0, w.size(0)).narrow(3, 0, w.size(1)).copy_(permuted);
  return out;
}

// A contiguous fp32 vector of length `k_pad` (zero past v's length).
at::Tensor channel_vector(const at::Tensor& v, int64_t k_pad) {
  at::Tensor out = v.contiguous();
  if (k_pad != v.size(0)) {
    at::Tensor padded = at::zeros({k_pad}, v.options());
    padded.narrow(0, 0, v.size(0)).copy_(v);
    out = padded;
  }
  return out;
}

// ===========================================================================
// Argument checks.
// ===========================================================================

void check_tensor(const char* name, const at::Tensor& t, int64_t ndim) {
  const bool ok = t.defined() && t.layout() == at::kStrided && t.is_cuda() && t.dim() == ndim;
  TORCH_CHECK_VALUE(ok, kOp, ": expected `", name, "` to be a ", ndim, "-D strided CUDA tensor, got ", describe(t));
}

std::vector<int64_t> check_pair(const char* name, c10::SymIntArrayRef values, int64_t min) {
  TORCH_CHECK_VALUE(values.size() == 2, kOp, ": expected `", name, "` to have 2 values (height, width), got ",
                    values.size());
  std::vector<int64_t> out;
  for (const c10::SymInt& v : values) out.push_back(v.guard_int(__FILE__, __LINE__));
  TORCH_CHECK_VALUE(out[0] >= min && out[1] >= min, kOp, ": expected `", name, "` values >= ", min, ", got [", out[0],
                    ", ", out[1], "]");
  return out;
}

void check_vector(const char* name, const at::Tensor& v, int64_t K, const at::Tensor& x) {
  const bool ok = v.defined() && v.layout() == at::kStrided && v.dim() == 1 && v.size(0) == K &&
                  v.scalar_type() == at::kFloat && v.device() == x.device();
  TORCH_CHECK_VALUE(ok, kOp, ": expected `", name, "` to be a 1-D float32 tensor of length ", K,
                    " (one value per output channel) on ", x.device(), ", got ", describe(v));
}

void check_launch(const ConvLaunchResult& r, const ConvProblem& p, const KernelChoice& kernel) {
  if (r.status == 0) return;
  std::ostringstream os;
  os << kOp << ": CUTLASS " << r.stage << " failed (" << r.status_string;
  if (r.cuda != cudaSuccess) os << "; CUDA error " << cudaGetErrorName(r.cuda) << ": " << cudaGetErrorString(r.cuda);
  os << ") for the " << kernel.name() << " kernel on N=" << p.N << " H=" << p.H << " W=" << p.W << " C=" << p.C
     << " K=" << p.K << " R=" << p.R << " S=" << p.S << " P=" << p.P << " Q=" << p.Q << " groups=" << p.groups;
  if (r.cuda == cudaSuccess) {  // CUTLASS refused the problem: the host code's preparation is wrong
    os << "; expected dense 16-byte-aligned NHWC/KRSC operands with C/groups and K/groups multiples of the "
          "kernel's channel alignment and each tensor below 2^31 bytes (the host code guarantees these; "
          "this is a bug)";
  }
  TORCH_CHECK(false, os.str());
}

#ifdef FASTRES_WITH_SM90
conv::Sm90Plan plan_sm90(ConvDtype dtype, Sm90Tile tile, const ConvProblem& p) {
  return dtype == ConvDtype::kF16 ? conv::plan_conv_sm90_f16(tile, p) : conv::plan_conv_sm90_bf16(tile, p);
}
#endif

// One launch of `kernel` (an sm90 kernel gets its workspace, if any, from the
// caching allocator with `options`' device).
ConvLaunchResult run(ConvDtype dtype, const KernelChoice& kernel, const ConvProblem& p, int sms,
                     const at::TensorOptions& options, cudaStream_t stream) {
  if (kernel.sm90) {
#ifdef FASTRES_WITH_SM90
    const int64_t bytes = plan_sm90(dtype, kernel.sm90_tile, p).workspace_bytes;
    const at::Tensor workspace = bytes > 0 ? at::empty({bytes}, options.dtype(at::kByte)) : at::Tensor();
    void* ws = bytes > 0 ? workspace.data_ptr() : nullptr;
    return dtype == ConvDtype::kF16 ? conv::run_conv_sm90_f16(kernel.sm90_tile, p, ws, sms, stream)
                                    : conv::run_conv_sm90_bf16(kernel.sm90_tile, p, ws, sms, stream);
#endif
  }
  switch (dtype) {
    case ConvDtype::kF16:
      return conv::run_conv_f16(kernel.tile, p, stream);
    case ConvDtype::kBF16:
      return conv::run_conv_bf16(kernel.tile, p, stream);
    case ConvDtype::kF32:
      return conv::run_conv_tf32(kernel.tile, p, stream);
  }
  return ConvLaunchResult{};
}

// ===========================================================================
// The ops.
// ===========================================================================

at::Tensor conv_bn_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual_in,
                            c10::SymIntArrayRef stride_in, c10::SymIntArrayRef padding_in,
                            c10::SymIntArrayRef dilation_in, c10::SymInt groups_in, c10::string_view activation) {
  check_tensor("x", x_in, 4);
  check_tensor("weight", weight_in, 4);
  const at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK_VALUE(weight_in.scalar_type() == dtype && weight_in.device() == x_in.device(), kOp,
                    ": expected `weight` to have the dtype and device of `x` (", describe(x_in), "), got ",
                    describe(weight_in));
  const std::vector<int64_t> stride = check_pair("stride", stride_in, 1);
  const std::vector<int64_t> padding = check_pair("padding", padding_in, 0);
  const std::vector<int64_t> dilation = check_pair("dilation", dilation_in, 1);
  const int64_t groups = groups_in.guard_int(__FILE__, __LINE__);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t K = weight_in.size(0), R = weight_in.size(2), S = weight_in.size(3);
  TORCH_CHECK_VALUE(groups >= 1 && C == weight_in.size(1) * groups && K % groups == 0, kOp,
                    ": expected `weight` of shape (K, C/groups, R, S) with K divisible by groups=", groups,
                    " and C/groups = ", C, "/", groups, "; got weight ", weight_in.sizes(), " for x ",
                    x_in.sizes());
  // F.conv2d refuses an empty image in a non-empty batch ("Only zero batch or
  // zero channel inputs are supported"); here it would also divide by zero in
  // the batch chunking below (image_in == 0).
  TORCH_CHECK_VALUE(N == 0 || (H > 0 && W > 0), kOp, ": expected `x` with a non-empty image (H, W > 0) or an "
                    "empty batch, got ", x_in.sizes());
  const ConvGeometry geom{dtype, C, H, W, K, R, S, groups, {stride[0], stride[1]}, {padding[0], padding[1]},
                          {dilation[0], dilation[1]}};
  const int64_t P = geom.P(), Q = geom.Q();
  TORCH_CHECK_VALUE(P >= 1 && Q >= 1, kOp, ": the convolution output would be empty (", P, "x", Q, "): input ",
                    x_in.sizes(), " is smaller than the dilated kernel ", R, "x", S, " with padding [", padding[0],
                    ", ", padding[1], "]");
  const Activation act = parse_activation(activation, kOp);

  // What the kernels cannot run is NotImplementedError (before the checks of
  // scale/shift/residual: a float64 x legitimately comes with float64 vectors).
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int device = x_in.get_device();
  const std::string reason = unsupported_reason(geom, device_major(device));
  TORCH_CHECK_NOT_IMPLEMENTED(reason.empty(), kOp, ": ", reason);

  check_vector("scale", scale, K, x_in);
  check_vector("shift", shift, K, x_in);
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  if (has_residual) {
    const at::Tensor& r = *residual_in;
    const bool ok = r.defined() && r.layout() == at::kStrided && r.dim() == 4 && r.size(0) == N &&
                    r.size(1) == K && r.size(2) == P && r.size(3) == Q && r.scalar_type() == dtype &&
                    r.device() == x_in.device();
    TORCH_CHECK_VALUE(ok, kOp, ": expected `residual` of the output's shape [", N, ", ", K, ", ", P, ", ", Q,
                      "] and dtype ", dtype_name(dtype), " on ", x_in.device(), ", got ", describe(r));
  }

  // The output, in F.conv2d's memory format: cuDNN's rule
  // (cudnn_conv_suggest_memory_format) is channels_last when x's or weight's
  // suggest_memory_format() is, which also holds for tensors that are both
  // NCHW- and NHWC-contiguous but were made channels_last (a 1x1 weight
  // (K, C, 1, 1), a C == 1 input); fastres/_layout.py conv_out_channels_last.
  const bool out_channels_last = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                                 weight_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto out_format = out_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (N == 0 || K == 0) {
    return at::empty({N, K, P, Q}, x_in.options().memory_format(out_format));
  }

  // Channel padding (ConvGeometry::c_pad, k_pad).
  const int64_t c_pad = geom.c_pad(), k_pad = geom.k_pad();

  const at::Tensor x = nhwc(x_in, c_pad);
  const at::Tensor w = krsc(weight_in, k_pad, c_pad / groups);
  const at::Tensor scale_v = channel_vector(scale, k_pad);
  const at::Tensor shift_v = channel_vector(shift, k_pad);
  const at::Tensor residual = has_residual ? nhwc(*residual_in, k_pad) : at::Tensor();

  // The kernel writes NHWC [N, P, Q, k_pad]: into the output itself when that
  // is channels_last without padding, else into a buffer copied out after.
  const bool direct = out_channels_last && k_pad == K;
  at::Tensor out = at::empty({N, K, P, Q}, x_in.options().memory_format(out_format));
  const at::Tensor y = direct ? out
                              : at::empty({N, k_pad, P, Q}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));

  const ConvDtype kdtype = dtype == at::kHalf ? ConvDtype::kF16
                           : dtype == at::kBFloat16 ? ConvDtype::kBF16
                                                    : ConvDtype::kF32;
  const int sms = sm_count(device);
  const KernelChoice kernel = choose_kernel(geom, N * P * Q, device_major(device), sms);

  // Batch chunks: each launch keeps x, weight and output below 2^31 bytes (unsupported_reason
  // checked the weight and one image of each).
  const int64_t elem = x.element_size();
  const int64_t image_in = H * W * c_pad * elem, image_out = P * Q * k_pad * elem;
  const int64_t chunk = std::max<int64_t>(1, std::min({N, kMaxTensorBytes / image_in, kMaxTensorBytes / image_out}));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const auto* x_ptr = static_cast<const char*>(x.const_data_ptr());
  const auto* r_ptr = has_residual ? static_cast<const char*>(residual.const_data_ptr()) : nullptr;
  auto* y_ptr = static_cast<char*>(y.data_ptr());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n = std::min(chunk, N - n0);
    ConvProblem p = problem(geom, n, c_pad, k_pad);
    p.x = x_ptr + n0 * image_in;
    p.w = w.const_data_ptr();
    p.residual = has_residual ? r_ptr + n0 * image_out : nullptr;
    p.y = y_ptr + n0 * image_out;
    p.scale = scale_v.const_data_ptr<float>();
    p.shift = shift_v.const_data_ptr<float>();
    p.activation = static_cast<int>(act);
    check_launch(run(kdtype, kernel, p, sms, x.options(), stream), p, kernel);
  }
  if (!direct) out.copy_(k_pad == K ? y : y.narrow(1, 0, K));
  return out;
}

// One convolution geometry from an op's plain arguments (checked).
ConvGeometry geometry_arg(const char* op, at::ScalarType dtype, int64_t C, int64_t H, int64_t W, int64_t K,
                          int64_t R, int64_t S, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(groups >= 1 && C % groups == 0 && K % groups == 0, op, ": expected C and K divisible by "
                    "groups >= 1, got C=", C, ", K=", K, ", groups=", groups);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": expected `stride`, `padding` and `dilation` of 2 values each");
  return ConvGeometry{dtype, C, H, W, K, R, S, groups, {stride[0], stride[1]}, {padding[0], padding[1]},
                      {dilation[0], dilation[1]}};
}

// The one rule without a GPU: `major` is the device's compute capability
// major (torch.cuda.get_device_capability(device)[0]); the other arguments as
// the op takes them (x's C, H, W; weight's K, R, S).
std::string conv_bn_act_cuda_unsupported(at::ScalarType dtype, int64_t C, int64_t H, int64_t W, int64_t K, int64_t R,
                                         int64_t S, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups, int64_t major) {
  const ConvGeometry g =
      geometry_arg("_conv_bn_act_cuda_unsupported", dtype, C, H, W, K, R, S, stride, padding, dilation, groups);
  return unsupported_reason(g, static_cast<int>(major));
}

// The kernel conv_bn_act_cuda would run a batch of N with, on a GPU of
// compute capability `major`.x with `sms` SMs: choose_kernel's name, or
// "unsupported: <why>" for a conv it refuses.
std::string conv_bn_act_cuda_kernel(at::ScalarType dtype, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                                    int64_t R, int64_t S, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, int64_t major, int64_t sms) {
  const ConvGeometry g =
      geometry_arg("_conv_bn_act_cuda_kernel", dtype, C, H, W, K, R, S, stride, padding, dilation, groups);
  const std::string reason = unsupported_reason(g, static_cast<int>(major));
  if (!reason.empty()) return "unsupported: " + reason;
  return choose_kernel(g, N * g.P() * g.Q(), static_cast<int>(major), static_cast<int>(sms)).name();
}

std::string conv_bn_act_cuda_sm90_unsupported(at::ScalarType dtype, int64_t C, int64_t H, int64_t W, int64_t K,
                                              int64_t R, int64_t S, at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups, int64_t major) {
  const ConvGeometry g =
      geometry_arg("_conv_bn_act_cuda_sm90_unsupported", dtype, C, H, W, K, R, S, stride, padding, dilation, groups);
  const std::string reason = unsupported_reason(g, static_cast<int>(major));
  return reason.empty() ? sm90_unsupported_reason(g, static_cast<int>(major)) : reason;
}

// The names of the compiled kernels, as choose_kernel names them.
std::vector<std::string> conv_bn_act_cuda_kernels() {
  std::vector<std::string> names;
  for (const TileShape& t : k16BitTiles) names.push_back(KernelChoice{false, Sm90Tile::k128x128, t.tile}.name());
  names.push_back(KernelChoice{false, Sm90Tile::k128x128, ConvTile::kStem}.name());
  names.push_back(KernelChoice{false, Sm90Tile::k128x128, ConvTile::kTf32}.name());
  if (kSm90Built) {
    for (const Sm90TileShape& t : kSm90Tiles) names.push_back(KernelChoice{true, t.tile}.name());
  }
  return names;
}

#ifdef FASTRES_WITH_SM90
// What the sm90 kernel `tile` (0: 128x128, 1: 128x64) would run for
// conv2d(x (N, C, H, W), weight (K, C, R, S)), from CUTLASS's host code alone:
// [implementable, workspace bytes, GEMM M, N, K, output N, P, Q, K,
//  shared memory bytes, threads, pipeline stages, cluster M].
std::vector<int64_t> conv_bn_act_cuda_sm90_plan(at::ScalarType dtype, int64_t tile, int64_t N, int64_t C, int64_t H,
                                                int64_t W, int64_t K, int64_t R, int64_t S, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "_conv_bn_act_cuda_sm90_plan";
  const ConvGeometry g = geometry_arg(op, dtype, C, H, W, K, R, S, stride, padding, dilation, 1);
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16, op, ": expected `dtype` float16 or bfloat16, got ",
                    dtype_name(dtype));
  TORCH_CHECK_VALUE(tile == 0 || tile == 1, op, ": expected `tile` 0 (128x128) or 1 (128x64), got ", tile);
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(std::max({N, C, H, W, K, R, S}) <= int_max && g.P() >= 1 && g.Q() >= 1, op,
                    ": expected a non-empty output and extents below 2^31");
  const ConvProblem p = problem(g, N, C, K);
  const ConvDtype kdtype = dtype == at::kHalf ? ConvDtype::kF16 : ConvDtype::kBF16;
  const conv::Sm90Plan r = plan_sm90(kdtype, static_cast<Sm90Tile>(tile), p);
  return {r.implementable, r.workspace_bytes, r.gemm_m, r.gemm_n, r.gemm_k, r.out_n, r.out_p, r.out_q, r.out_k,
          r.smem_bytes, r.threads, r.stages, r.cluster_m};
}
#endif

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("conv_bn_act_cuda", &fastres::conv_bn_act_cuda);
}

TORCH_LIBRARY_IMPL(fastres, CompositeImplicitAutograd, m) {
  m.impl("_conv_bn_act_cuda_unsupported", &fastres::conv_bn_act_cuda_unsupported);
  m.impl("_conv_bn_act_cuda_kernel", &fastres::conv_bn_act_cuda_kernel);
  m.impl("_conv_bn_act_cuda_sm90_unsupported", &fastres::conv_bn_act_cuda_sm90_unsupported);
  m.impl("_conv_bn_act_cuda_kernels", &fastres::conv_bn_act_cuda_kernels);
#ifdef FASTRES_WITH_SM90
  m.impl("_conv_bn_act_cuda_sm90_plan", &fastres::conv_bn_act_cuda_sm90_plan);
#endif
}
