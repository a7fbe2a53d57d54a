// csrc/bindings.cpp — every schema of the compiled fastres ops, in one place.
//
// The schemas are declared here, once, for every build; the kernels register
// themselves next to their code (csrc/cuda/elementwise.cu:
// TORCH_LIBRARY_IMPL(fastres, CUDA, m); csrc/cpu/bn_act.cpp: ..., CPU, m). A
// C++-only build (no nvcc, CPU-only torch or FASTRES_BUILD_CUDA=0; see setup.py)
// has the schemas and the CPU kernels but no CUDA kernels, so calling a CUDA op
// reports that it has no kernel for the tensors' backend.
//
// The Triton twins `<op>_triton` (fastres/triton/) are defined in Python with
// identical signatures, and fastres/ops.py registers one fake kernel and one
// autograd formula per op family for both backends; tests/test_extension.py
// checks that the schemas agree. Semantics: fastres/reference.py.

#include <Python.h>

#include <string>

#include <torch/library.h>

// `import fastres._C` loads this shared library, which runs the registrations
// below. The module itself is empty: the ops are reached through
// torch.ops.fastres, so no pybind11 and only the limited Python C API.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                  // m_name
      "fastres compiled ops; use them through torch.ops.fastres",  // m_doc
      -1,                                                    // m_size
      nullptr,                                               // m_methods
  };
  return PyModule_Create(&module_def);
}
}

namespace fastres {

// The CUDA architectures the kernels were compiled for, space-separated
// ("8.0 8.6 8.9 9.0"); "" in a C++-only build. setup.py passes
// TORCH_CUDA_ARCH_LIST as the preprocessor token FASTRES_CUDA_ARCH_LIST with
// '_' between the entries (a token survives every shell and compiler quoting).
std::string cuda_arch_list() {
#ifdef FASTRES_CUDA_ARCH_LIST
#define FASTRES_STRINGIFY_(x) #x
#define FASTRES_STRINGIFY(x) FASTRES_STRINGIFY_(x)
  std::string archs = FASTRES_STRINGIFY(FASTRES_CUDA_ARCH_LIST);
  for (char& ch : archs) {
    if (ch == '_') ch = ' ';
  }
  return archs;
#else
  return "";
#endif
}

}  // namespace fastres

TORCH_LIBRARY(fastres, m) {
  // y = act(x + residual), computed in fp32 (fp64 for fp64), one rounding;
  // act in {"relu", "silu", "identity"}. x and residual: same shape and dtype,
  // any rank; y has x's memory format. Replaces torch.relu(x + residual).
  m.def("add_act_cuda(Tensor x, Tensor residual, str activation) -> Tensor");

  // grad * act'(x + residual): the gradient of both x and residual of add_act.
  m.def("add_act_backward_cuda(Tensor grad, Tensor x, Tensor residual, str activation) -> Tensor");

  // y = act(x * scale[c] + shift[c] (+ residual)) for a 4-D (N, C, H, W) x,
  // NCHW or channels_last; scale/shift: fp32 vectors of length C (an eval-mode
  // BatchNorm, fastres.ops.bn_scale_shift). Replaces relu(bn(x) (+ residual)).
  m.def("bn_act_cuda(Tensor x, Tensor scale, Tensor shift, Tensor? residual, str activation) -> Tensor");

  // Backward of bn_act in one pass: with z = x * scale[c] + shift[c] (+ residual)
  // and gz = grad * act'(z), returns (grad_x = gz * scale[c], grad_z = gz if
  // residual_grad else an empty tensor, grad_scale[c] = sum_{n,h,w} gz * x,
  // grad_shift[c] = sum_{n,h,w} gz, y = act(z), the forward output recomputed
  // in the same pass, if output else an empty tensor). Deterministic reductions.
  // The training path keeps x (a conv output) for backward instead of y and
  // gets y back here for the weight gradient of the next conv (fastres/nn/_fuse.py).
  m.def(
      "bn_act_backward_cuda(Tensor grad, Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
      "str activation, bool residual_grad, bool output=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The CPU kernels of fastres._cpu_bn (csrc/cpu/bn_act.cpp, in every build):
  // y = act(x * scale[c] + shift[c] (+ residual)) in one pass, the reference's
  // roundings; and nn.BatchNorm2d's training backward after the activation's,
  // (grad_x, grad_weight, grad_bias, gz if grad_z else an empty tensor), from the
  // BN input x, the output `out` (ReLU's mask; recomputed from x if None) and the
  // batch statistics (scale = weight * invstd, shift = bias - mean * scale).
  m.def("_bn_act_cpu(Tensor x, Tensor scale, Tensor shift, Tensor? residual, str activation) -> Tensor");
  m.def(
      "_bn_act_train_backward_cpu(Tensor grad, Tensor x, Tensor? out, Tensor scale, Tensor shift, Tensor mean, "
      "Tensor invstd, str activation, bool grad_z) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same in place: y over x; grad_x over grad (of x's dtype and strides), or over x if
  // over_x, returning (grad_weight, grad_bias, gz): for tensors no one else holds.
  m.def("_bn_act_cpu_(Tensor(a!) x, Tensor scale, Tensor shift, Tensor? residual, str activation) -> ()");
  m.def(
      "_bn_act_train_backward_cpu_(Tensor(a!) grad, Tensor(b!) x, Tensor? out, Tensor scale, Tensor shift, "
      "Tensor mean, Tensor invstd, str activation, bool grad_z, bool over_x) -> (Tensor, Tensor, Tensor)");
  // And the batch mean and biased variance of x per channel, in one pass, updating
  // the running statistics in place as nn.BatchNorm2d does where they are given.
  m.def(
      "_bn_stats_cpu(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) "
      "-> (Tensor, Tensor)");

#ifdef FASTRES_WITH_CUTLASS
  // y = act(conv2d(x, weight, stride, padding, dilation, groups) * scale[k] + shift[k] (+ residual)):
  // one CUTLASS implicit-GEMM convolution whose epilogue applies the fp32
  // per-output-channel scale/shift, the residual and the activation to the
  // fp32 accumulator, rounding once (csrc/cuda/conv_bn_act.cu, docs/cuda_conv.md).
  // x (N, C, H, W) and weight (K, C/groups, R, S): float16, bfloat16, or float32
  // (TF32, when torch.backends.cudnn.allow_tf32); either memory format; the
  // output has F.conv2d's memory format. Replaces relu(bn(conv(x)) (+ residual)).
  // Declared, like the Triton twin, only where it has a kernel: built only with
  // CUDA and CUTLASS (setup.py), so implemented_backends("conv_bn_act") lacks
  // "cuda" otherwise.
  m.def(
      "conv_bn_act_cuda(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
      "SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups, str activation) -> Tensor");

  // "" if conv_bn_act_cuda runs conv2d(x (N, C, H, W), weight (K, C/groups, R, S),
  // stride, padding, dilation, groups) on a GPU of compute capability
  // sm_major.x, else why not: the kernels' one rule (dtype, channels, window,
  // 32-bit coordinates, tensor sizes), which the op checks and
  // fastres._extension.cuda_conv_unsupported_reason asks to route backend=None.
  m.def(
      "_conv_bn_act_cuda_unsupported(ScalarType dtype, int C, int H, int W, int K, int R, int S, int[] stride, "
      "int[] padding, int[] dilation, int groups, int sm_major) -> str");

  // The kernel conv_bn_act_cuda runs such a conv with, for a batch of N on a
  // GPU of compute capability sm_major.x with `sms` SMs ("sm90 128x128x64
  // cluster 2x1x1", "sm80 128x64x32", ...), or "unsupported: <why>": the one
  // routing rule between the Hopper (CUTLASS 3.x) and Sm80 (CUTLASS 2.x) kernels.
  m.def(
      "_conv_bn_act_cuda_kernel(ScalarType dtype, int N, int C, int H, int W, int K, int R, int S, int[] stride, "
      "int[] padding, int[] dilation, int groups, int sm_major, int sms) -> str");

  // "" if the Hopper kernels run such a conv on a GPU of compute capability
  // sm_major.x, else why not (then the Sm80 kernels do, or another backend).
  m.def(
      "_conv_bn_act_cuda_sm90_unsupported(ScalarType dtype, int C, int H, int W, int K, int R, int S, "
      "int[] stride, int[] padding, int[] dilation, int groups, int sm_major) -> str");

  // The names of the compiled conv kernels (fastres.info lists them).
  m.def("_conv_bn_act_cuda_kernels() -> str[]");

#ifdef FASTRES_WITH_SM90
  // What the Hopper kernel `tile` (0: 128x128x64, 1: 128x64x64) would run for
  // conv2d of x (N, C, H, W) and weight (K, C, R, S), from CUTLASS's host code
  // alone (no GPU): [implementable, workspace bytes, GEMM M, N, K, output N, P,
  // Q, K, shared memory bytes per CTA, threads per CTA, pipeline stages, cluster M].
  m.def(
      "_conv_bn_act_cuda_sm90_plan(ScalarType dtype, int tile, int N, int C, int H, int W, int K, int R, int S, "
      "int[] stride, int[] padding, int[] dilation) -> int[]");
#endif
#endif

  // The CUDA architectures of the compiled kernels, space-separated; "" when
  // the extension was built without CUDA (fastres._extension.cuda_arch_list).
  m.def("_cuda_arch_list() -> str", &fastres::cuda_arch_list);
}
