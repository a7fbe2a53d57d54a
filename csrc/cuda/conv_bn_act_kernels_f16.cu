// csrc/cuda/conv_bn_act_kernels_f16.cu — the float16 kernels of conv_bn_act_cuda
// (one translation unit per dtype, so that the build compiles them in
// parallel). The kernel types, the epilogue and the tile dispatch
// (run_conv_16bit): conv_bn_act.cuh; the host code that picks a tile and
// calls run_conv_f16: conv_bn_act.cu.
#include "conv_bn_act.cuh"

namespace fastres {
namespace conv {

ConvLaunchResult run_conv_f16(ConvTile tile, const ConvProblem& p, cudaStream_t stream) {
  return run_conv_16bit<cutlass::half_t>(tile, p, stream);
}

}  // namespace conv
}  // namespace fastres
