// csrc/cuda/conv_bn_act.cuh — the CUTLASS side of the fused conv-BN-activation
// op `conv_bn_act_cuda` (host side: conv_bn_act.cu; design: docs/cuda_conv.md).
//
// Computes, for NHWC x [N, H, W, C], KRSC weight [K, R, S, C/groups] and an
// NHWC output y [N, P, Q, K] (the implicit GEMM's row-major D of M = N*P*Q rows
// and K columns):
//
//   y[m, k] = act(acc[m, k] * scale[k] + shift[k] (+ residual[m, k]))
//   acc[m, k] = sum_{r, s, c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*CG + c] * w[k, r, s, c]
//
// and replaces `relu(bn(conv2d(x, w)) (+ residual))` for an eval-mode
// BatchNorm given as fp32 (scale, shift). acc is the fp32 accumulator of a
// CUTLASS 2.x Sm80 tensor-core implicit GEMM (`ImplicitGemmMultistage`
// mainloop, cp.async pipeline, mma.sync; runs on Ampere, Ada and Hopper); it
// never leaves registers/shared memory before the epilogue below has applied
// scale, shift, residual and activation and rounded once to the output type.
//
// Epilogue = CUTLASS's `EpilogueWithVisitor` (the accumulator tile is staged
// through shared memory by CUTLASS's own warp/shared-load iterators, exactly as
// in the default epilogue) driven by `BnActVisitor`, which knows each
// fragment's output column and therefore loads the per-column fp32 scale[k] and
// shift[k] once per thread, reads the residual as the epilogue's "source"
// tensor C through CUTLASS's `PredicatedTileIterator` (same NHWC layout as the
// output), and stores through the output iterator. `BnActEpilogue` adapts the
// visitor epilogue to the interface `cutlass::conv::kernel::ImplicitGemmConvolution`
// expects of its Epilogue (`epilogue(output_op, iterator_D, accumulators,
// iterator_C)`), so the kernel itself is CUTLASS's, unchanged, with its group
// support (GroupMode::kSingleGroup).
//
// Numerics per element (fp32, each op rounded once, no FMA contraction; the
// same formulas as bn_act in elementwise.cu and fastres/reference.py):
//   z = add_rn(mul_rn(acc, scale[k]), shift[k]);  z = add_rn(z, float(residual));
//   y = OutputType(act(z))   (round to nearest even; NaN propagates through relu)
//
// The kernel translation units (conv_bn_act_kernels_*.cu) include this header
// and no ATen header (compile time); they export `run_conv_*` (declared at the
// bottom), which the host code in conv_bn_act.cu calls.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "activations.cuh"

// Everything below the plain-C++ interface needs CUTLASS; conv_bn_act.cu
// includes only the interface (FASTRES_CONV_INTERFACE_ONLY) to keep CUTLASS out
// of the TU that includes ATen.
#ifndef FASTRES_CONV_INTERFACE_ONLY
#include <cutlass/cutlass.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/convolution.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/kernel/default_conv2d_fprop.h>
#include <cutlass/conv/kernel/implicit_gemm_convolution.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/epilogue/threadblock/epilogue_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#endif

namespace fastres {
namespace conv {

// ===========================================================================
// The interface between the host code (conv_bn_act.cu) and the kernel TUs.
// ===========================================================================

// Element type of x, weight, residual and output.
enum class ConvDtype : int { kF16 = 0, kBF16 = 1, kF32 = 2 /* TF32 tensor cores */ };

// The compiled kernel configurations (docs/cuda_conv.md, "Tile configurations").
//   ThreadblockShape (M x N x K), warps, stages; iterator; channel alignment
enum class ConvTile : int {
  k128x128 = 0,  // 16-bit: 128x128x32, 4 warps of 64x64, 4 stages; kOptimized, align 8
  k128x64 = 1,   // 16-bit: 128x64x32,  4 warps of 64x32, 6 stages; kOptimized, align 8
  k64x64 = 2,    // 16-bit: 64x64x32,   4 warps of 32x32, 6 stages; kOptimized, align 8
  k128x32 = 3,   // 16-bit: 128x32x32,  2 warps of 64x32, 4 stages; kOptimized, align 8
  kStem = 4,     // 16-bit: 128x64x32,  4 warps of 64x32, 4 stages; kFixedChannels, C == 4, align 4
  kTf32 = 5,     // fp32:   128x64x16,  4 warps of 64x32, 6 stages; kOptimized, align 4 (TF32 mma)
};

// One convolution as the kernels see it: dense NHWC/KRSC tensors whose
// channel counts already meet the configuration's alignment (the host pads).
struct ConvProblem {
  int N, H, W, C;        // input (C: all groups)
  int K, R, S;           // filter: K output channels, R x S window, C / groups input channels
  int P, Q;              // output spatial size
  int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
  int groups;
  const void* x;         // [N, H, W, C]
  const void* w;         // [K, R, S, C / groups]
  const void* residual;  // [N, P, Q, K] or nullptr
  void* y;               // [N, P, Q, K]
  const float* scale;    // [K]
  const float* shift;    // [K]
  int activation;        // fastres::Activation
};

// What a launch returned: `status` is a cutlass::Status as int (0 = success);
// `stage` names the failing step ("can_implement", "workspace", "initialize",
// "run"); `cuda` the CUDA error of a failed launch.
struct ConvLaunchResult {
  int status = 0;
  const char* stage = "";
  cudaError_t cuda = cudaSuccess;
  const char* status_string = "";
};

// Checks `can_implement` and launches on `stream` (one TU per dtype).
ConvLaunchResult run_conv_f16(ConvTile tile, const ConvProblem& p, cudaStream_t stream);
ConvLaunchResult run_conv_bf16(ConvTile tile, const ConvProblem& p, cudaStream_t stream);
ConvLaunchResult run_conv_tf32(ConvTile tile, const ConvProblem& p, cudaStream_t stream);

// The Hopper (sm_90a) kernels, CUTLASS 3.x (conv_bn_act_sm90.cuh; built when
// TORCH_CUDA_ARCH_LIST has 9.0a, FASTRES_WITH_SM90). 16-bit only, groups == 1,
// C and K multiples of 8; the tile is M x N x 64, the cluster 2 x 1 x 1.
enum class Sm90Tile : int {
  k128x128 = 0,  // 128x128x64, one consumer warpgroup (128 fp32 accumulators per thread)
  k128x64 = 1,   // 128x64x64 (K = 64 layers, and more CTAs where 128x128 leaves SMs idle)
};

// What an sm90 kernel would run for a problem, computed on the host alone
// (plan_conv_sm90_*: no GPU or driver needed): CUTLASS's can_implement and
// workspace size, the implicit GEMM's extents (M = N*P*Q, N = K,
// K = R*S*C) and output [N, P, Q, K] as CUTLASS derives them, and the CTA's
// shared memory, threads, pipeline stages and cluster size.
struct Sm90Plan {
  bool implementable = false;
  int64_t workspace_bytes = 0;
  int64_t gemm_m = 0, gemm_n = 0, gemm_k = 0;
  int out_n = 0, out_p = 0, out_q = 0, out_k = 0;
  int smem_bytes = 0, threads = 0, stages = 0, cluster_m = 0;
};

Sm90Plan plan_conv_sm90_f16(Sm90Tile tile, const ConvProblem& p);
Sm90Plan plan_conv_sm90_bf16(Sm90Tile tile, const ConvProblem& p);
// Checks can_implement, builds the TMA descriptors and launches on `stream`
// (`workspace`: plan's workspace_bytes, or nullptr for 0; `sms`: the GPU's SM count).
ConvLaunchResult run_conv_sm90_f16(Sm90Tile tile, const ConvProblem& p, void* workspace, int sms,
                                   cudaStream_t stream);
ConvLaunchResult run_conv_sm90_bf16(Sm90Tile tile, const ConvProblem& p, void* workspace, int sms,
                                    cudaStream_t stream);

#ifndef FASTRES_CONV_INTERFACE_ONLY

// ===========================================================================
// Epilogue: output-op parameters, visitor, and the adapter to the conv kernel.
// ===========================================================================

// The epilogue's runtime parameters: `ImplicitGemmConvolution` stores them as
// `EpilogueOutputOp::Params` and hands a `BnActOutputOp` built from them to the
// epilogue of every threadblock. Activation and residual are runtime values,
// uniform over the grid (one kernel serves all six epilogue variants: the
// branch costs nothing next to the mainloop, and compile time stays small).
struct BnActParams {
  const float* scale = nullptr;  // [K]
  const float* shift = nullptr;  // [K]
  int activation = 0;            // fastres::Activation
  bool has_residual = false;     // read the source tensor C (the residual)
};

// The kernel's `EpilogueOutputOp`: carries the parameters (the visitor does
// the math). split-K is never used (the host launches split_k_slices == 1), so
// `set_k_partition` has nothing to do; the kernel only calls it for split-K.
template <typename ElementOutput_, typename ElementAccumulator_>
struct BnActOutputOp {
  using ElementOutput = ElementOutput_;
  using ElementAccumulator = ElementAccumulator_;
  using ElementCompute = float;
  using Params = BnActParams;

  Params params;

  CUTLASS_HOST_DEVICE explicit BnActOutputOp(Params const& p) : params(p) {}
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params.has_residual; }
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}
};

// The EpilogueWithVisitor visitor (concept: cutlass::epilogue::threadblock::
// EpilogueFusedVisitorConcept). Per step (an OutputTileIterator::kIterations
// slice of the threadblock tile), EpilogueWithVisitor stages the accumulators
// through shared memory and calls visit() for each kElementsPerAccess-wide
// vector of this thread's fragment; `frag_idx` indexes the same fragment
// layout as OutputTileIterator::Fragment, whose column access is
// frag_idx % ThreadMap::Iterations::kColumn at column
// thread_start_column + that * ThreadMap::Delta::kColumn (+ 0..kElementsPerAccess-1).
template <typename OutputTileIterator_, typename ElementAccumulator_>
class BnActVisitor {
 public:
  using OutputTileIterator = OutputTileIterator_;
  using ThreadMap = typename OutputTileIterator::ThreadMap;
  using ElementOutput = typename OutputTileIterator::Element;
  using ElementAccumulator = ElementAccumulator_;

  static int const kIterations = OutputTileIterator::kIterations;
  static int const kElementsPerAccess = OutputTileIterator::kElementsPerAccess;
  static int const kColumnAccesses = ThreadMap::Iterations::kColumn;

  using AccumulatorFragment = cutlass::Array<ElementAccumulator, kElementsPerAccess>;
  using OutputVector = cutlass::Array<ElementOutput, kElementsPerAccess>;
  using Fragment = typename OutputTileIterator::Fragment;

  static_assert(Fragment::kElements % kElementsPerAccess == 0, "fragment holds whole accesses");

  CUTLASS_DEVICE
  BnActVisitor(BnActParams const& params, OutputTileIterator const& iterator_D, OutputTileIterator const& iterator_C)
      : params_(params), iterator_D_(iterator_D), iterator_C_(iterator_C) {}

  // scale/shift of this thread's columns, once per threadblock tile (0 past K:
  // those columns are never stored).
  CUTLASS_DEVICE void begin_epilogue() {
    int const column0 = iterator_D_.thread_start_column();
    int const columns = iterator_D_.extent_column();
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kColumnAccesses; ++j) {
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < kElementsPerAccess; ++e) {
        int const column = column0 + j * ThreadMap::Delta::kColumn + e;
        bool const inside = column < columns;
        scale_[j][e] = inside ? params_.scale[column] : 0.f;
        shift_[j][e] = inside ? params_.shift[column] : 0.f;
      }
    }
  }

  // The residual slice of this step (predicated loads: rows past M and columns
  // past K are not read and stay 0).
  CUTLASS_DEVICE void begin_step(int) {
    if (params_.has_residual) {
      fragment_C_.clear();
      iterator_C_.load(fragment_C_);
      ++iterator_C_;
    }
  }

  CUTLASS_DEVICE void begin_row(int) {}

  CUTLASS_DEVICE void visit(int, int, int, int frag_idx, AccumulatorFragment const& accum) {
    int const j = frag_idx % kColumnAccesses;
    OutputVector const& source = reinterpret_cast<OutputVector const*>(&fragment_C_)[frag_idx];
    OutputVector& output = reinterpret_cast<OutputVector*>(&fragment_D_)[frag_idx];
    cutlass::NumericConverter<ElementOutput, float, cutlass::FloatRoundStyle::round_to_nearest> to_output;
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < kElementsPerAccess; ++e) {
      float z = add_rn(mul_rn(static_cast<float>(accum[e]), scale_[j][e]), shift_[j][e]);
      if (params_.has_residual) {
        z = add_rn(z, static_cast<float>(source[e]));
      }
      output[e] = to_output(apply_activation(params_.activation, z));
    }
  }

  CUTLASS_DEVICE void end_row(int) {}

  // Predicated stores: rows past M and columns past K are not written.
  CUTLASS_DEVICE void end_step(int) {
    iterator_D_.store(fragment_D_);
    ++iterator_D_;
  }

  CUTLASS_DEVICE void end_epilogue() {}

 private:
  BnActParams params_;
  OutputTileIterator iterator_D_;
  OutputTileIterator iterator_C_;
  Fragment fragment_C_;
  Fragment fragment_D_;
  float scale_[kColumnAccesses][kElementsPerAccess];
  float shift_[kColumnAccesses][kElementsPerAccess];
};

// The threadblock epilogue handed to ImplicitGemmConvolution: CUTLASS's
// EpilogueWithVisitor built from the kernel's default tensor-op epilogue (same
// shared-memory staging, thread maps and output iterator), called the way the
// conv kernel calls its epilogue.
template <typename DefaultEpilogue>
class BnActEpilogue
    : public cutlass::epilogue::threadblock::EpilogueWithVisitorFromExistingEpilogue<
          BnActVisitor<typename DefaultEpilogue::OutputTileIterator, typename DefaultEpilogue::ElementAccumulator>,
          DefaultEpilogue>::Epilogue {
 public:
  using OutputTileIterator = typename DefaultEpilogue::OutputTileIterator;
  using ElementAccumulator = typename DefaultEpilogue::ElementAccumulator;
  using Visitor = BnActVisitor<OutputTileIterator, ElementAccumulator>;
  using Base = typename cutlass::epilogue::threadblock::EpilogueWithVisitorFromExistingEpilogue<
      Visitor, DefaultEpilogue>::Epilogue;
  using OutputOp = BnActOutputOp<typename OutputTileIterator::Element, ElementAccumulator>;
  using AccumulatorTile = typename Base::AccumulatorTile;
  using SharedStorage = typename Base::SharedStorage;

  // Split-K partitions would be summed in shared memory by EpilogueWithVisitor
  // with a pointer stride it derives for kPartitionsK; the configurations here
  // never split the threadblock's K among warps.
  static_assert(DefaultEpilogue::kPartitionsK == 1, "warp-level split-K is not used");

  CUTLASS_DEVICE
  BnActEpilogue(SharedStorage& shared_storage, int thread_idx, int warp_idx, int lane_idx)
      : Base(shared_storage, thread_idx, warp_idx, lane_idx) {}

  CUTLASS_DEVICE
  void operator()(OutputOp const& output_op, OutputTileIterator destination_iterator,
                  AccumulatorTile const& accumulators, OutputTileIterator source_iterator) {
    Visitor visitor(output_op.params, destination_iterator, source_iterator);
    Base::operator()(visitor, accumulators);
  }
};

// ===========================================================================
// Kernel types.
// ===========================================================================

// CUTLASS's identity swizzle with 4-wide rasterization, as the CUTLASS library
// uses for its conv kernels (L2 reuse of the filter tiles).
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>;

// An Sm80 tensor-core fprop kernel on NHWC/KRSC/NHWC `Element` tensors with an
// fp32 accumulator and the BN-activation epilogue:
//   * the mainloop (Mma) of cutlass::conv::kernel::DefaultConv2dFprop for the
//     iterator algorithm and operand alignment (in elements);
//   * its default epilogue (only as the source of the epilogue's types: a
//     LinearCombination placeholder, never run) turned into BnActEpilogue;
//     StrideSupport::kUnity selects only that epilogue's packed row-major
//     output iterator (ldm = K); the fprop kOptimized/kFixedChannels
//     iterators take any stride, padding and dilation (their kStrideSupport
//     is kStrided whatever is passed);
//   * cutlass::conv::kernel::ImplicitGemmConvolution with `GroupMode`:
//     kSingleGroup for kOptimized (it also runs groups == 1 unchanged: the
//     group offset is 0 and the k-iteration count R*S*ceil(C/kK) the same),
//     kNone for kFixedChannels (whose iteration count CUTLASS defines only there).
template <typename Element, typename ThreadblockShape, typename WarpShape, typename InstructionShape, int Stages,
          cutlass::conv::IteratorAlgorithm Algorithm, int Alignment, cutlass::conv::GroupMode GroupMode>
struct ConvBnActKernel {
  static int const kOutputAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using Placeholder = cutlass::epilogue::thread::LinearCombination<Element, kOutputAlignment, float, float>;
  using Default = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::TensorNHWC,
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape,
      Placeholder, Swizzle, Stages, cutlass::arch::OpMultiplyAdd, Algorithm, cutlass::conv::StrideSupport::kUnity,
      Alignment, Alignment>::Kernel;
  using Epilogue = BnActEpilogue<typename Default::Epilogue>;
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolution<typename Default::Mma, Epilogue, Swizzle,
                                                                cutlass::conv::Operator::kFprop,
                                                                cutlass::conv::Conv2dProblemSize, GroupMode>;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// can_implement, then the launch on `stream`. No workspace: split-K is not
// used (split_k_slices == 1, kSerial), for which CUTLASS needs none.
template <typename Config>
ConvLaunchResult launch(const ConvProblem& p, cudaStream_t stream) {
  using Device = typename Config::Device;
  using Element = typename Device::ElementA;
  using Layout = cutlass::layout::TensorNHWC;
  ConvLaunchResult result;

  cutlass::conv::Conv2dProblemSize problem(p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q, p.pad_h, p.pad_w,
                                           p.stride_h, p.stride_w, p.dil_h, p.dil_w,
                                           cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1, p.groups);
  auto* x = static_cast<Element*>(const_cast<void*>(p.x));
  auto* w = static_cast<Element*>(const_cast<void*>(p.w));
  auto* r = static_cast<Element*>(const_cast<void*>(p.residual));
  auto* y = static_cast<Element*>(p.y);
  Layout const x_layout = Layout::packed({p.N, p.H, p.W, p.C});
  Layout const w_layout = Layout::packed({p.K, p.R, p.S, p.C / p.groups});
  Layout const y_layout = Layout::packed({p.N, p.P, p.Q, p.K});

  BnActParams epilogue;
  epilogue.scale = p.scale;
  epilogue.shift = p.shift;
  epilogue.activation = p.activation;
  epilogue.has_residual = p.residual != nullptr;

  typename Device::Arguments args(problem, cutlass::TensorRef<Element, Layout>(x, x_layout),
                                  cutlass::TensorRef<Element, Layout>(w, w_layout),
                                  cutlass::TensorRef<Element, Layout>(r, y_layout),
                                  cutlass::TensorRef<Element, Layout>(y, y_layout), epilogue,
                                  cutlass::conv::SplitKMode::kSerial);

  auto fail = [&](cutlass::Status status, const char* stage) {
    result.status = static_cast<int>(status);
    result.stage = stage;
    result.status_string = cutlass::cutlassGetStatusString(status);
    return result;
  };
  cutlass::Status status = Device::can_implement(args);
  if (status != cutlass::Status::kSuccess) return fail(status, "can_implement");
  if (Device::get_workspace_size(args) != 0) return fail(cutlass::Status::kErrorWorkspaceNull, "workspace");
  // Device::initialize + Device::run, written out: Device::run reads (and so
  // clears) the launch's CUDA error itself and returns only kErrorInternal,
  // which would leave nothing to report. Here the error is kept in `cuda`.
  using Kernel = typename Config::Kernel;
  const typename Kernel::Params params(args, /*semaphore=*/nullptr);
  const int smem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  if (smem >= (48 << 10)) {
    result.cuda = cudaFuncSetAttribute(cutlass::Kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (result.cuda != cudaSuccess) return fail(cutlass::Status::kErrorInternal, "initialize");
  }
  const dim3 grid = typename Kernel::ThreadblockSwizzle().get_grid_shape(params.grid_tiled_shape);
  const dim3 block(Kernel::kThreadCount, 1, 1);
  cutlass::Kernel<Kernel><<<grid, block, smem, stream>>>(params);
  result.cuda = cudaGetLastError();
  if (result.cuda != cudaSuccess) return fail(cutlass::Status::kErrorInternal, "run");
  return result;
}

// The result for a (dtype, tile) pair that has no kernel (a host-code bug).
inline ConvLaunchResult not_compiled(ConvTile) {
  ConvLaunchResult result;
  result.status = static_cast<int>(cutlass::Status::kErrorNotSupported);
  result.stage = "dispatch (no kernel compiled for this dtype and tile)";
  result.status_string = cutlass::cutlassGetStatusString(cutlass::Status::kErrorNotSupported);
  return result;
}

// The tile shapes of ConvTile (see the enum).
template <int M, int N, int K>
using Shape = cutlass::gemm::GemmShape<M, N, K>;

template <typename Element>
using Large16 = ConvBnActKernel<Element, Shape<128, 128, 32>, Shape<64, 64, 32>, Shape<16, 8, 16>, 4,
                                cutlass::conv::IteratorAlgorithm::kOptimized, 8, cutlass::conv::GroupMode::kSingleGroup>;
template <typename Element>
using Medium16 = ConvBnActKernel<Element, Shape<128, 64, 32>, Shape<64, 32, 32>, Shape<16, 8, 16>, 6,
                                 cutlass::conv::IteratorAlgorithm::kOptimized, 8, cutlass::conv::GroupMode::kSingleGroup>;
template <typename Element>
using Small16 = ConvBnActKernel<Element, Shape<64, 64, 32>, Shape<32, 32, 32>, Shape<16, 8, 16>, 6,
                                cutlass::conv::IteratorAlgorithm::kOptimized, 8, cutlass::conv::GroupMode::kSingleGroup>;
template <typename Element>
using Narrow16 = ConvBnActKernel<Element, Shape<128, 32, 32>, Shape<64, 32, 32>, Shape<16, 8, 16>, 4,
                                 cutlass::conv::IteratorAlgorithm::kOptimized, 8, cutlass::conv::GroupMode::kSingleGroup>;
template <typename Element>
using Stem16 = ConvBnActKernel<Element, Shape<128, 64, 32>, Shape<64, 32, 32>, Shape<16, 8, 16>, 4,
                               cutlass::conv::IteratorAlgorithm::kFixedChannels, 4, cutlass::conv::GroupMode::kNone>;
using Tf32 = ConvBnActKernel<float, Shape<128, 64, 16>, Shape<64, 32, 16>, Shape<16, 8, 8>, 6,
                             cutlass::conv::IteratorAlgorithm::kOptimized, 4, cutlass::conv::GroupMode::kSingleGroup>;

// The body of run_conv_f16 and run_conv_bf16: the 16-bit kernel of `tile` for
// `Element` (cutlass::half_t or cutlass::bfloat16_t). Each dtype's TU
// (conv_bn_act_kernels_{f16,bf16}.cu) instantiates it for its own type only,
// so the two compile in parallel.
template <typename Element>
ConvLaunchResult run_conv_16bit(ConvTile tile, const ConvProblem& p, cudaStream_t stream) {
  switch (tile) {
    case ConvTile::k128x128:
      return launch<Large16<Element>>(p, stream);
    case ConvTile::k128x64:
      return launch<Medium16<Element>>(p, stream);
    case ConvTile::k64x64:
      return launch<Small16<Element>>(p, stream);
    case ConvTile::k128x32:
      return launch<Narrow16<Element>>(p, stream);
    case ConvTile::kStem:
      return launch<Stem16<Element>>(p, stream);
    default:
      return not_compiled(tile);
  }
}

#endif  // FASTRES_CONV_INTERFACE_ONLY

}  // namespace conv
}  // namespace fastres
