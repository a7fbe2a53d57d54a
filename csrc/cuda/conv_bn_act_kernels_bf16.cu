// csrc/cuda/conv_bn_act_kernels_bf16.cu — the bfloat16 kernels of conv_bn_act_cuda
// (one translation unit per dtype, so that the build compiles them in
// parallel). The kernel types, the epilogue and the tile dispatch
// (run_conv_16bit): conv_bn_act.cuh; the host code that picks a tile and
// calls run_conv_bf16: conv_bn_act.cu.
#include "conv_bn_act.cuh"

namespace fastres {
namespace conv {

ConvLaunchResult run_conv_bf16(ConvTile tile, const ConvProblem& p, cudaStream_t stream) {
  return run_conv_16bit<cutlass::bfloat16_t>(tile, p, stream);
}

}  // namespace conv
}  // namespace fastres
