// csrc/cuda/conv_bn_act_sm90.cuh — the Hopper-native (sm_90a) kernels of
// conv_bn_act_cuda: CUTLASS 3.x implicit-GEMM convolutions (TMA im2col loads,
// warpgroup MMA, a warp-specialized producer/consumer pipeline) whose epilogue
// is an epilogue visitor tree (EVT) computing the fused BN / residual /
// activation on the fp32 accumulator (host side and routing: conv_bn_act.cu;
// design: docs/cuda_conv.md, "Hopper kernels").
//
// The same math and rounding as the Sm80 kernels (conv_bn_act.cuh) and
// fastres.reference.conv_bn_act, per element, in fp32:
//
//   z = add_rn(mul_rn(acc, scale[k]), shift[k])      AffineFn    (node "affine")
//   z = add_rn(z, float(residual))  (with a residual) ResidualActFn (the root)
//   y = OutputType(act(z))          (round to nearest even)
//
// The tree, children first (CUTLASS's Sm90EVT):
//
//   root  Sm90Compute<ResidualActFn, Element>     runtime activation, has_residual
//   ├── affine  Sm90Compute<AffineFn, float>      no rounding to Element in between
//   │   ├── Sm90AccFetch                          the fp32 accumulator
//   │   ├── Sm90RowBroadcast<float> scale         per output channel (GEMM column)
//   │   └── Sm90RowBroadcast<float> shift
//   └── ResidualFetch<Element>                    the residual as the source tensor C,
//                                                 TMA-loaded only when there is one
//
// Activation and residual are runtime values, uniform over the grid, as in the
// Sm80 kernels: one kernel per (dtype, tile) serves all six epilogue variants.
//
// Like conv_bn_act.cuh, the kernel translation units
// (conv_bn_act_sm90_kernels_*.cu) include this header and no ATen header; the
// host code calls them through the plain-C++ interface in conv_bn_act.cuh
// (Sm90Tile, Sm90Plan, plan_conv_sm90_*, run_conv_sm90_*).
#pragma once

// Release-mode device code, as CUTLASS's own builds: cute's device-side
// assert()s (pointer alignment checks) are calls to __assertfail, across which
// ptxas serializes every wgmma of the kernel (warning C7510). No fastres code
// in these translation units relies on assert().
#ifndef NDEBUG
#define NDEBUG
#endif

#include "conv_bn_act.cuh"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>

namespace fastres {
namespace conv {
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// ===========================================================================
// The EVT's compute nodes and the residual fetch.
// ===========================================================================

// z = acc * scale + shift, each operation rounded once (no FMA contraction).
// Sm90Compute instantiates the functor on Array<float, N> fragments (and on
// float, to look for runtime Arguments: it has none).
template <class T>
struct AffineFn {
  CUTLASS_HOST_DEVICE T operator()(T acc, T scale, T shift) const { return add_rn(mul_rn(acc, scale), shift); }
};
template <int N>
struct AffineFn<cutlass::Array<float, N>> {
  using Fragment = cutlass::Array<float, N>;
  CUTLASS_HOST_DEVICE Fragment operator()(Fragment const& acc, Fragment const& scale, Fragment const& shift) const {
    Fragment z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) z[i] = add_rn(mul_rn(acc[i], scale[i]), shift[i]);
    return z;
  }
};

// The root's runtime arguments (Sm90Compute hands them to the functor).
struct ResidualActArguments {
  int activation = 0;         // fastres::Activation
  bool has_residual = false;  // add the source tensor C
};

// y = act(z (+ residual)) in fp32; Sm90Compute rounds the result once to the
// output type (round to nearest even).
template <class T>
struct ResidualActFn {
  using Arguments = ResidualActArguments;
  CUTLASS_HOST_DEVICE T operator()(T z, T residual, Arguments const& args) const {
    return apply_activation(args.activation, args.has_residual ? add_rn(z, residual) : z);
  }
};
template <int N>
struct ResidualActFn<cutlass::Array<float, N>> {
  using Arguments = ResidualActArguments;
  using Fragment = cutlass::Array<float, N>;
  CUTLASS_HOST_DEVICE Fragment operator()(Fragment const& z, Fragment const& residual, Arguments const& args) const {
    Fragment y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      y[i] = apply_activation(args.activation, args.has_residual ? add_rn(z[i], residual[i]) : z[i]);
    }
    return y;
  }
};

// The source tensor C (the residual), fetched only when `enabled`: CUTLASS's
// Sm90SrcFetch always asks the collective epilogue to TMA-load C; this node
// asks it only at run time, so a conv without a residual reads nothing more
// (its fragment is then never used: ResidualActFn checks has_residual).
template <class Element>
struct ResidualFetch : fusion::Sm90SrcFetch<Element> {
  struct SharedStorage {};
  struct Arguments {
    bool enabled = false;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE ResidualFetch() {}
  CUTLASS_HOST_DEVICE ResidualFetch(Params const& params, SharedStorage const&) : enabled(params.enabled) {}

  CUTLASS_DEVICE bool is_producer_load_needed() const { return enabled; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return enabled; }

  bool enabled = false;
};

// ===========================================================================
// Kernel types.
// ===========================================================================

// A CUTLASS 3.x sm90 fprop kernel on NHWC x / KRSC weight / NHWC residual and
// output `Element` tensors (fp16 or bf16) with an fp32 accumulator:
//   * mainloop: conv::collective::CollectiveBuilder<Sm90, OpClassTensorOp,
//     kFprop> with KernelImplicitTmaWarpSpecializedSm90: im2col TMA loads of x,
//     tiled TMA loads of the filter, WGMMA from shared memory (SS), one
//     producer and one consumer warpgroup (the only conv schedule of
//     CUTLASS 4.2's sm90 collective: its dispatch policy rejects the persistent
//     cooperative and ping-pong schedules for convolutions); as many pipeline
//     stages as fit beside the epilogue's shared memory;
//   * epilogue: epilogue::collective::CollectiveBuilder<Sm90> with
//     TmaWarpSpecialized (TMA loads of C, TMA stores of D) running BnActTree;
//   * TileMN x 64 tiles (4 WGMMA k-steps of 16 per tile), 16-byte (8-element)
//     operand alignment (TMA), cluster ClusterM x 1: the CTAs of one cluster
//     share the filter tile, which TMA multicasts to both.
template <class Element, int TileM, int TileN, int ClusterM>
struct Sm90ConvBnAct {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using Layout = cutlass::layout::TensorNHWC;
  using TileShape = cute::Shape<Int<TileM>, Int<TileN>, cute::Shape<_64>>;
  using ClusterShape = cute::Shape<Int<ClusterM>, _1, _1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using Scale = fusion::Sm90RowBroadcast<0, TileShape, float>;
  using Affine = fusion::Sm90EVT<fusion::Sm90Compute<AffineFn, float, float, kRound>, fusion::Sm90AccFetch, Scale,
                                 Scale>;
  using BnActTree =
      fusion::Sm90EVT<fusion::Sm90Compute<ResidualActFn, Element, float, kRound>, Affine, ResidualFetch<Element>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, Layout, kAlignment, Element, Layout,
      kAlignment, cutlass::epilogue::TmaWarpSpecialized, BnActTree>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element, Layout,
      kAlignment, Element, Layout, kAlignment, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue, void>;

  static_assert(Mainloop::NumSpatialDimensions == 2, "2-D convolutions");
};

// The problem shape CUTLASS receives for `p` (dense NHWC x [N, H, W, C],
// KRSC weight [K, R, S, C], symmetric padding as F.conv2d's).
template <class Config>
typename Config::ProblemShape problem_shape(const ConvProblem& p) {
  using ProblemShape = typename Config::ProblemShape;
  return ProblemShape(cutlass::conv::Mode::kCrossCorrelation, {p.N, p.H, p.W, p.C}, {p.K, p.R, p.S, p.C},
                      {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w},
                      /*groups=*/1);
}

// The kernel's arguments for `p` on a GPU with `sms` SMs. The output and
// residual are dense NHWC [N, P, Q, K], which the epilogue sees as the GEMM's
// ((Q, P, N), K) matrix: strides ((K, Q*K, P*Q*K), 1).
template <class Config>
typename Config::Kernel::Arguments arguments(const ConvProblem& p, int sms) {
  using Kernel = typename Config::Kernel;
  using Element = typename Kernel::CollectiveMainloop::ElementA;
  using StrideC = typename Kernel::CollectiveEpilogue::StrideC;
  using StrideD = typename Kernel::CollectiveEpilogue::StrideD;
  const int64_t K = p.K, QK = int64_t(p.Q) * p.K, PQK = int64_t(p.P) * p.Q * p.K;
  StrideC stride_c{};
  get<0>(stride_c) = make_stride(K, QK, PQK);
  StrideD stride_d{};
  get<0>(stride_d) = make_stride(K, QK, PQK);
  const bool residual = p.residual != nullptr;
  auto* y = static_cast<Element*>(p.y);
  // Without a residual, C aliases the output so that its TMA descriptor is
  // valid; ResidualFetch never loads it then.
  auto* c = residual ? static_cast<const Element*>(p.residual) : y;

  typename Kernel::CollectiveEpilogue::Arguments epilogue{};
  epilogue.thread = {
      {{}, {p.scale}, {p.shift}, {}},           // affine: accumulator, scale, shift, node
      {residual},                               // ResidualFetch
      {p.activation, residual},                 // root node
  };
  epilogue.ptr_C = c;
  epilogue.dC = stride_c;
  epilogue.ptr_D = y;
  epilogue.dD = stride_d;

  typename Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = problem_shape<Config>(p);
  args.mainloop = {static_cast<const Element*>(p.x), static_cast<const Element*>(p.w)};
  args.epilogue = epilogue;
  args.hw_info.sm_count = sms;
  return args;
}

// What the kernel would run for `p`, computed on the host only (no GPU, no
// driver call): can_implement, workspace, the GEMM extents and the output size
// CUTLASS derives, shared memory and threads per CTA.
template <class Config>
Sm90Plan plan(const ConvProblem& p) {
  using Kernel = typename Config::Kernel;
  const auto args = arguments<Config>(p, /*sms=*/1);
  Sm90Plan out;
  out.implementable = Kernel::can_implement(args);
  out.workspace_bytes = static_cast<int64_t>(Kernel::get_workspace_size(args));
  const auto& shape = args.problem_shape;
  const auto mnkl = cutlass::conv::detail::get_transformed_problem_shape_MNKL(shape);
  out.gemm_m = static_cast<int64_t>(cute::product(get<0>(mnkl)));
  out.gemm_n = static_cast<int64_t>(cute::product(get<1>(mnkl)));
  out.gemm_k = static_cast<int64_t>(cute::product(get<2>(mnkl)));
  out.out_n = shape.shape_C[0];
  out.out_p = shape.shape_C[1];
  out.out_q = shape.shape_C[2];
  out.out_k = shape.shape_C[3];
  out.smem_bytes = static_cast<int>(Kernel::SharedStorageSize);
  out.threads = static_cast<int>(Kernel::MaxThreadsPerBlock);
  out.stages = Kernel::CollectiveMainloop::DispatchPolicy::Stages;
  out.cluster_m = size<0>(typename Config::ClusterShape{});
  return out;
}

// can_implement, then the launch on `stream` (a cluster launch: cluster
// ClusterM x 1 x 1), keeping the CUDA error of a failed launch.
template <class Config>
ConvLaunchResult launch(const ConvProblem& p, void* workspace, int sms, cudaStream_t stream) {
  using Kernel = typename Config::Kernel;
  ConvLaunchResult result;
  auto fail = [&](cutlass::Status status, const char* stage) {
    result.status = static_cast<int>(status);
    result.stage = stage;
    result.status_string = cutlass::cutlassGetStatusString(status);
    return result;
  };
  const auto args = arguments<Config>(p, sms);
  if (!Kernel::can_implement(args)) return fail(cutlass::Status::kErrorInvalidProblem, "can_implement");
  cutlass::Status status = Kernel::initialize_workspace(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return fail(status, "initialize");
  // Builds the TMA descriptors (cuTensorMapEncode*).
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, workspace);
  const int smem = static_cast<int>(Kernel::SharedStorageSize);
  const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
  result.cuda = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (result.cuda != cudaSuccess) return fail(cutlass::Status::kErrorInternal, "initialize");

  cudaLaunchConfig_t config{};
  config.gridDim = Kernel::get_grid_shape(params);
  config.blockDim = Kernel::get_block_shape();
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = size<0>(typename Config::ClusterShape{});
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  void* kernel_args[] = {&params};
  result.cuda = cudaLaunchKernelExC(&config, kernel, kernel_args);
  if (result.cuda == cudaSuccess) result.cuda = cudaGetLastError();
  if (result.cuda != cudaSuccess) return fail(cutlass::Status::kErrorInternal, "run");
  return result;
}

// The tiles of Sm90Tile (see the enum in conv_bn_act.cuh).
template <class Element>
using Wide = Sm90ConvBnAct<Element, 128, 128, 2>;
template <class Element>
using Narrow = Sm90ConvBnAct<Element, 128, 64, 2>;

inline Sm90Plan plan_not_compiled() {
  Sm90Plan out;
  out.implementable = false;
  return out;
}

// The bodies of plan_conv_sm90_{f16,bf16} and run_conv_sm90_{f16,bf16}; each
// dtype's TU instantiates them for its own type only.
template <class Element>
Sm90Plan plan_16bit(Sm90Tile tile, const ConvProblem& p) {
  switch (tile) {
    case Sm90Tile::k128x128:
      return plan<Wide<Element>>(p);
    case Sm90Tile::k128x64:
      return plan<Narrow<Element>>(p);
  }
  return plan_not_compiled();
}

template <class Element>
ConvLaunchResult run_16bit(Sm90Tile tile, const ConvProblem& p, void* workspace, int sms, cudaStream_t stream) {
  switch (tile) {
    case Sm90Tile::k128x128:
      return launch<Wide<Element>>(p, workspace, sms, stream);
    case Sm90Tile::k128x64:
      return launch<Narrow<Element>>(p, workspace, sms, stream);
  }
  return not_compiled(ConvTile::k128x128);
}

}  // namespace sm90
}  // namespace conv
}  // namespace fastres
