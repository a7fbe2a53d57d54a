// csrc/cuda/conv_bn_act_kernels_tf32.cu — the float32 (TF32 tensor-core)
// kernel of conv_bn_act_cuda, run only where torch.backends.cudnn.allow_tf32
// allows it (conv_bn_act.cu). The kernel type and the epilogue:
// conv_bn_act.cuh.
#include "conv_bn_act.cuh"

namespace fastres {
namespace conv {

ConvLaunchResult run_conv_tf32(ConvTile tile, const ConvProblem& p, cudaStream_t stream) {
  if (tile == ConvTile::kTf32) return launch<Tf32>(p, stream);
  return not_compiled(tile);
}

}  // namespace conv
}  // namespace fastres
