// csrc/cuda/conv_bn_act_sm90_kernels_bf16.cu — the bfloat16 Hopper (sm_90a) kernels of
// conv_bn_act_cuda (one translation unit per dtype, so that the build compiles
// them in parallel). Kernel types, EVT epilogue and launch:
// conv_bn_act_sm90.cuh; routing and the host side: conv_bn_act.cu.
#include "conv_bn_act_sm90.cuh"

namespace fastres {
namespace conv {

Sm90Plan plan_conv_sm90_bf16(Sm90Tile tile, const ConvProblem& p) {
  return sm90::plan_16bit<cutlass::bfloat16_t>(tile, p);
}

ConvLaunchResult run_conv_sm90_bf16(Sm90Tile tile, const ConvProblem& p, void* workspace, int sms,
                                  cudaStream_t stream) {
  return sm90::run_16bit<cutlass::bfloat16_t>(tile, p, workspace, sms, stream);
}

}  // namespace conv
}  // namespace fastres
