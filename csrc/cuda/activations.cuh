// csrc/cuda/activations.cuh — the ONE header of device functors shared by every
// fastres CUDA kernel (the elementwise kernels of elementwise.cu and the fused
// conv epilogue of conv_bn_act.cuh).
//
// It holds:
//   * `Activation`, parsed once on the host from the op's `str activation`
//     argument (`parse_activation`), and `dispatch_activation`, which turns the
//     runtime value into a compile-time template argument;
//   * `act_forward<ACT>(z)`  = act(z), and `act_backward<ACT>(z, g)` = g * act'(z),
//     the exact formulas of PyTorch's kernels (below), in the compute type;
//   * `acc_type<scalar_t>`: the compute type, float for float/half/bfloat16 and
//     double for double (fastres/reference.py `compute_dtype`);
//   * `mul_rn` / `add_rn`: one IEEE-rounded multiply / add that the compiler may
//     not fuse into an FMA, so that `x * scale + shift` rounds twice exactly as
//     the two PyTorch ops of the reference (`x * scale` then `+ shift`) do;
//   * `AffineEpilogue`: the epilogue of every elementwise kernel on VEC
//     elements, z = x * scale[c] + shift[c] (+ residual), y = act(z), and its
//     backward gz = g * act'(z).
//
// Formulas (z and g in the compute type; fastres/reference.py is the truth):
//   relu:      act(z) = z > 0 ? z : (z != z ? z : 0)          torch.relu (NaN propagates)
//              g * act'(z) = z <= 0 ? 0 : g                   threshold_backward(g, relu(z), 0):
//                                                             a NaN z passes g through
//   silu:      act(z) = z / (1 + exp(-z))                     F.silu (ATen silu_kernel)
//              g * act'(z) = g * s * (1 + z * (1 - s)),       silu_backward
//                            s = 1 / (1 + exp(-z))
//   identity:  act(z) = z;  g * act'(z) = g
//
// No fast-math anywhere: exp is the accurate expf/exp and the division is
// IEEE-rounded, as in PyTorch's own kernels (setup.py never passes
// --use_fast_math).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>

namespace fastres {

// ---------------------------------------------------------------------------
// Activation: host-side parsing and compile-time dispatch.
// ---------------------------------------------------------------------------

// The values match the Triton kernels' ACT_CODES (fastres/triton/_utils.py).
enum class Activation : int { kIdentity = 0, kRelu = 1, kSilu = 2 };

// The names every op accepts, in the order error messages list them
// (fastres/_checks.py ACTIVATIONS).
constexpr const char* kActivationNames = "'relu', 'silu', 'identity'";

inline const char* activation_name(Activation act) {
  switch (act) {
    case Activation::kRelu:
      return "relu";
    case Activation::kSilu:
      return "silu";
    case Activation::kIdentity:
      return "identity";
  }
  return "?";
}

// Parses the `activation` argument of op `op`; throws (ValueError in Python,
// like fastres._checks.check_activation) listing the valid names otherwise.
inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "identity") return Activation::kIdentity;
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name.data(), name.size()),
                    "'; expected one of ", kActivationNames);
  return Activation::kIdentity;  // unreachable
}

template <Activation ACT>
using ActivationConstant = std::integral_constant<Activation, ACT>;

// Calls `f(ActivationConstant<ACT>{})` for the runtime `act`, so the activation
// becomes a template argument of the kernel:
//
//   dispatch_activation(act, [&](auto act_c) {
//     constexpr Activation ACT = decltype(act_c)::value;
//     my_kernel<scalar_t, ACT><<<grid, block, 0, stream>>>(...);
//   });
template <typename F>
decltype(auto) dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kRelu:
      return std::forward<F>(f)(ActivationConstant<Activation::kRelu>{});
    case Activation::kSilu:
      return std::forward<F>(f)(ActivationConstant<Activation::kSilu>{});
    case Activation::kIdentity:
      break;
  }
  return std::forward<F>(f)(ActivationConstant<Activation::kIdentity>{});
}

// ---------------------------------------------------------------------------
// Compute type and exactly-rounded arithmetic.
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct AccType {
  using type = float;  // float, c10::Half, c10::BFloat16
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// a * b and a + b rounded once each, never contracted into an FMA (nvcc's
// default -fmad=true would fuse `x * s + b`; the reference rounds twice).
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// The accurate exponentials PyTorch's kernels call (c10::cuda::compat::exp).
C10_HOST_DEVICE inline float exp_acc(float z) { return ::expf(z); }
C10_HOST_DEVICE inline double exp_acc(double z) { return ::exp(z); }

// ---------------------------------------------------------------------------
// Activations and their derivatives (T = float or double, the compute type).
// ---------------------------------------------------------------------------

// act(z).
template <Activation ACT, typename T>
C10_HOST_DEVICE inline T act_forward(T z) {
  if constexpr (ACT == Activation::kRelu) {
    // torch.relu == clamp_min(z, 0) with NaN propagation.
    return z > T(0) ? z : (z != z ? z : T(0));
  } else if constexpr (ACT == Activation::kSilu) {
    // ATen silu_kernel: x / (1 + exp(-x)) in opmath.
    return z / (T(1) + exp_acc(-z));
  } else {
    return z;
  }
}

// act(z) for a runtime activation code (a kernel that keeps the activation a
// runtime value, uniform over the grid: the fused conv epilogues).
C10_HOST_DEVICE inline float apply_activation(int activation, float z) {
  switch (static_cast<Activation>(activation)) {
    case Activation::kRelu:
      return act_forward<Activation::kRelu>(z);
    case Activation::kSilu:
      return act_forward<Activation::kSilu>(z);
    default:
      return z;
  }
}

// g * act'(z): the gradient with respect to z given the output gradient g.
template <Activation ACT, typename T>
C10_HOST_DEVICE inline T act_backward(T z, T g) {
  if constexpr (ACT == Activation::kRelu) {
    // threshold_backward(g, relu(z), 0): `relu(z) <= 0 ? 0 : g`; relu(z) <= 0
    // exactly when z <= 0, and a NaN z (NaN output) passes g through.
    return z <= T(0) ? T(0) : g;
  } else if constexpr (ACT == Activation::kSilu) {
    // ATen silu_backward_kernel, written the same way.
    const T s = T(1) / (T(1) + exp_acc(-z));
    return g * s * (T(1) + z * (T(1) - s));
  } else {
    return g;
  }
}

// ---------------------------------------------------------------------------
// Vector memory access: VEC elements of 16 / sizeof(scalar_t) make one
// 128-bit load/store when the address is 16-byte aligned.
// ---------------------------------------------------------------------------

template <typename scalar_t>
constexpr int max_vec_size() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t val[VEC];
};

// Loads VEC elements at p (aligned to sizeof(Vec) when VEC > 1).
template <int VEC, typename scalar_t>
C10_DEVICE inline Vec<scalar_t, VEC> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
}

template <int VEC, typename scalar_t>
C10_DEVICE inline void store_vec(scalar_t* p, const Vec<scalar_t, VEC>& v) {
  *reinterpret_cast<Vec<scalar_t, VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------
// The elementwise epilogue: VEC elements of one memory vector, each with its
// channel's (scale, shift) (VEC consecutive channels in NHWC, one channel in
// NCHW):
//   z  = x * scale + shift (+ residual)    rounded after each op (the reference)
//   y  = act(z)
//   gz = g * act'(z)
// ---------------------------------------------------------------------------

template <typename scalar_t, int VEC>
struct AffineEpilogue {
  using acc_t = acc_type<scalar_t>;
  acc_t scale[VEC];
  acc_t shift[VEC];

  // VEC consecutive channels c0 .. c0 + VEC - 1 (channels innermost).
  C10_DEVICE static AffineEpilogue channels(const acc_t* scale, const acc_t* shift, int64_t c0) {
    AffineEpilogue e;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      e.scale[k] = scale[c0 + k];
      e.shift[k] = shift[c0 + k];
    }
    return e;
  }

  // Channel c for all VEC elements (a vector inside one (n, c) plane).
  C10_DEVICE static AffineEpilogue channel(const acc_t* scale, const acc_t* shift, int64_t c) {
    AffineEpilogue e;
    const acc_t s = scale[c], b = shift[c];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      e.scale[k] = s;
      e.shift[k] = b;
    }
    return e;
  }

  // Loads x at `off` into xa (compute type) and sets z = x * scale + shift,
  // plus residual[off] when `residual` is non-null.
  C10_DEVICE void affine(const scalar_t* x, const scalar_t* residual, int64_t off, acc_t (&xa)[VEC],
                         acc_t (&z)[VEC]) const {
    const Vec<scalar_t, VEC> xv = load_vec<VEC>(x + off);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xa[k] = static_cast<acc_t>(xv.val[k]);
      z[k] = add_rn(mul_rn(xa[k], scale[k]), shift[k]);
    }
    if (residual != nullptr) {
      const Vec<scalar_t, VEC> rv = load_vec<VEC>(residual + off);
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = add_rn(z[k], static_cast<acc_t>(rv.val[k]));
    }
  }

  // y[off] = act(x * scale + shift (+ residual)), rounded once to scalar_t.
  template <Activation ACT>
  C10_DEVICE void forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t off) const {
    acc_t xa[VEC], z[VEC];
    affine(x, residual, off, xa, z);
    Vec<scalar_t, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) yv.val[k] = static_cast<scalar_t>(act_forward<ACT>(z[k]));
    store_vec<VEC>(y + off, yv);
  }

  // The backward of `forward` at `off`: gz = grad * act'(z) in the compute
  // type (returned with x, for the caller's scale/shift reductions);
  // grad_x = gz * scale; grad_z = gz and y_out = act(z) where non-null.
  template <Activation ACT>
  C10_DEVICE void backward(const scalar_t* grad, const scalar_t* x, const scalar_t* residual, scalar_t* grad_x,
                           scalar_t* grad_z, scalar_t* y_out, int64_t off, acc_t (&xa)[VEC],
                           acc_t (&gz)[VEC]) const {
    acc_t z[VEC];
    affine(x, residual, off, xa, z);
    const Vec<scalar_t, VEC> gv = load_vec<VEC>(grad + off);
    Vec<scalar_t, VEC> gxv, gzv, yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      gz[k] = act_backward<ACT>(z[k], static_cast<acc_t>(gv.val[k]));
      gxv.val[k] = static_cast<scalar_t>(gz[k] * scale[k]);
      gzv.val[k] = static_cast<scalar_t>(gz[k]);
      yv.val[k] = static_cast<scalar_t>(act_forward<ACT>(z[k]));
    }
    store_vec<VEC>(grad_x + off, gxv);
    if (grad_z != nullptr) store_vec<VEC>(grad_z + off, gzv);
    if (y_out != nullptr) store_vec<VEC>(y_out + off, yv);
  }
};

}  // namespace fastres
