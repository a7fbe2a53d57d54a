// csrc/cuda/conv_bn_act_kernels_f16.cu — the float16 kernels of conv_bn_act_cuda
// (one translation unit per dtype, so that the build compiles them in
// parallel). The kernel types and the epilogue: conv_bn_act.cuh; the host
// code that picks a tile and calls run_conv_f16: conv_bn_act.cu.
#include "conv_bn_act.cuh"

namespace fastres {
namespace conv {

ConvLaunchResult run_conv_f16(ConvTile tile, const ConvProblem& p, cudaStream_t stream) {
  using Element = cutlass::half_t;
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

}  // namespace conv
}  // namespace fastres
