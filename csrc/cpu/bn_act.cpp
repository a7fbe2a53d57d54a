// csrc/cpu/bn_act.cpp — BatchNorm's affine, the residual add and the activation on
// the CPU in one pass over memory, and the training-mode BatchNorm + activation
// backward in two.
//
//   _bn_act_cpu:  y = act(x * scale[c] + shift[c] (+ residual))
//     fastres/reference.py's bn_act op for op in the compute dtype (fp32; fp64
//     for fp64): the product, + shift, + residual, the activation, one rounding
//     to x's dtype. setup.py compiles this file with -ffp-contract=off, so no
//     multiply-add is fused and the output is the reference's bit for bit.
//     Replaces torch.relu(batch_norm(x) (+ residual)): three passes over memory
//     in ATen (the normalization, add_, relu_), one here.
//
//   _bn_act_train_backward_cpu(_): nn.BatchNorm2d's training backward after the
//     activation's, from the BN input x (a conv output) and the batch statistics:
//       gz        = grad * act'(z)  (ReLU: where the output is > 0; the output is
//                   `out` if given, else act(x * scale + shift) rounded to x's
//                   dtype, recomputed here: the forward's own values)
//       grad_bias = sum gz,  dot = sum gz * (x - mean),  grad_weight = dot * invstd
//       grad_x    = (gz - grad_bias / M - (x - mean) * dot * invstd^2 / M) * scale
//     over (N, H, W) (M values per channel; scale = weight * invstd), and gz
//     itself if grad_z (a residual's gradient). Replaces threshold_backward +
//     native_batch_norm_backward(train=True): the mask costs no pass of its own.
//     The sums run over fixed blocks of the tensor in the compute dtype, the
//     blocks' sums in fp64 in a fixed order: the gradients do not depend on the
//     thread count.
//
//   _bn_stats_cpu: the batch mean and biased variance per channel over (N, H, W)
//     in one pass over memory (each block's mean, then its sum of squared
//     deviations from cache; the blocks merged in fp64 in a fixed order), and
//     nn.BatchNorm2d's running-statistics update in place where the running
//     buffers are given: running = momentum * stat + (1 - momentum) * running,
//     the variance unbiased. Replaces torch.batch_norm_update_stats (two passes).
//
// x: 4-D, NCHW-contiguous or channels_last, float32, float64 or bfloat16; every
// other tensor argument of x's size has x's dtype and strides (grad is made so);
// the per-channel vectors are of the compute dtype. fastres/_cpu_bn.py checks
// these and routes the cases this file does not take (float16, SiLU) elsewhere.
// Activations: "relu" (NaN propagates, as torch.relu) and "identity".

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include "dtype_name.h"

// The element loops are compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the
// baseline, and the loader picks the CPU's (GCC function multiversioning); every clone
// rounds each operation the same way (no contraction, no reassociation), so their results
// are identical.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTRES_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRES_CPU_CLONES
#endif

namespace fastres {
namespace {

enum class Act { kIdentity, kRelu };

Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(name == "identity", "fastres: activation: expected \"relu\" or \"identity\" on the CPU, got \"", name,
              "\"");
  return Act::kIdentity;
}

// Storage types: float, double, and bfloat16 as its bits (uint16_t, so that the
// conversions below are plain integer code the compiler vectorizes).
template <typename T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<uint16_t> {
  using type = float;
};
template <typename T>
using acc_t = typename ComputeType<T>::type;

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(uint16_t v) { return c10::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

template <typename T>
inline T narrow(acc_t<T> v) {
  return v;
}
// c10::BFloat16's round to nearest even (NaN to the quiet NaN 0x7FC0), without a branch.
template <>
inline uint16_t narrow<uint16_t>(float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
}

template <typename C>
inline C relu(C z) {
  return z < C(0) ? C(0) : z;  // NaN stays NaN
}

// x's elements in memory order as runs of rows that share a channel layout: a block of
// channels_last rows (`rows` rows of C elements, channel i at i of each) or a piece of an NCHW
// plane (one row of elements of channel c). `run(offset, rows, length, c)` gets c = -1 for
// channels_last rows. Runs are visited in parallel, about kGrain elements per task; a task's
// channels_last rows are one run, so that the element loop is entered once per task.
constexpr int64_t kGrain = 1 << 15;

struct Geometry {
  int64_t n, c, hw;
  bool channels_last;
};

Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3),
          !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)};
}

template <typename F>
void for_each_run(const Geometry& g, const F& run) {
  if (g.channels_last) {
    at::parallel_for(0, g.n * g.hw, std::max<int64_t>(1, kGrain / g.c),
                     [&](int64_t begin, int64_t end) { run(begin * g.c, end - begin, g.c, int64_t{-1}); });
  } else {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.hw, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t p = begin; p < end; ++p) run(p * g.hw, int64_t{1}, g.hw, p % g.c);
                     });
  }
}

// One run's y = act(x * s + b (+ r)) over `rows` rows of n elements; s, b are the rows'
// per-channel vectors (kPlane false) or the plane's channel's values (kPlane true, at index 0).
// kInPlace: x is y (x_in is unused), each element read before it is overwritten; a pointer of
// its own would alias y's.
template <typename T, Act A, bool kResidual, bool kPlane, bool kInPlace>
FASTRES_CPU_CLONES void affine_run(const T* __restrict__ x_in, const T* __restrict__ r, T* __restrict__ y,
                                   const acc_t<T>* __restrict__ s, const acc_t<T>* __restrict__ b, int64_t rows,
                                   int64_t n) {
  const T* x = kInPlace ? y : x_in;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t o = row * n;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = kPlane ? 0 : i;
      acc_t<T> z = widen(x[o + i]) * s[c] + b[c];
      if constexpr (kResidual) z = z + widen(r[o + i]);
      if constexpr (A == Act::kRelu) z = relu(z);
      y[o + i] = narrow<T>(z);
    }
  }
}

template <typename T, Act A, bool kResidual, bool kInPlace>
void affine(const Geometry& g, const T* x, const T* r, T* y, const acc_t<T>* scale, const acc_t<T>* shift) {
  for_each_run(g, [&](int64_t off, int64_t rows, int64_t len, int64_t c) {
    const T* xr = kInPlace ? nullptr : x + off;
    const T* rr = kResidual ? r + off : nullptr;
    if (c < 0) {
      affine_run<T, A, kResidual, false, kInPlace>(xr, rr, y + off, scale, shift, rows, len);
    } else {
      affine_run<T, A, kResidual, true, kInPlace>(xr, rr, y + off, scale + c, shift + c, rows, len);
    }
  });
}

// The scalar type's storage type and the kernel instantiated for it.
template <typename F>
void dispatch_storage(at::ScalarType t, const char* op, const F& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(uint16_t{});
    default:
      TORCH_CHECK(false, op, ": x: expected float32, float64 or bfloat16, got ", dtype_name(t));
  }
}

template <typename T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_dense(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes() &&
                  t.strides() == x.strides(),
              op, ": ", name, ": expected a CPU tensor of x's dtype, shape and strides");
}

// The compute dtype of x: float64 for float64, else float32 (fastres.reference.compute_dtype).
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  const auto ct = compute_type(x);
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == ct && v.dim() == 1 && v.size(0) == x.size(1) &&
                  v.is_contiguous(),
              op, ": ", name, ": expected a contiguous ", dtype_name(ct), " vector of length C = ", x.size(1), ", got ",
              dtype_name(v.scalar_type()), " of shape ", v.sizes());
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 &&
                  (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              op, ": x: expected a 4-D NCHW-contiguous or channels_last CPU tensor, got sizes ", x.sizes(),
              " and strides ", x.strides());
}

// Checks the arguments and computes the forward into y (a fresh tensor, or x itself).
void bn_act_into(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                 const std::optional<at::Tensor>& residual, const std::string& activation, const at::Tensor& y) {
  check_x(op, x);
  check_vector(op, "scale", scale, x);
  check_vector(op, "shift", shift, x);
  if (residual) check_dense(op, "residual", *residual, x);
  const Act act = parse_activation(activation);
  if (x.numel() == 0) return;
  const Geometry g = geometry(x);
  dispatch_storage(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = acc_t<T>;
    const T* r = residual ? data<T>(*residual) : nullptr;
    const auto run = [&](auto a, auto has_residual, auto in_place) {
      affine<T, decltype(a)::value, decltype(has_residual)::value, decltype(in_place)::value>(
          g, data<T>(x), r, data<T>(y), data<C>(scale), data<C>(shift));
    };
    const auto with_act = [&](auto has_residual, auto in_place) {
      act == Act::kRelu ? run(std::integral_constant<Act, Act::kRelu>{}, has_residual, in_place)
                        : run(std::integral_constant<Act, Act::kIdentity>{}, has_residual, in_place);
    };
    const auto with_residual = [&](auto in_place) {
      residual ? with_act(std::true_type{}, in_place) : with_act(std::false_type{}, in_place);
    };
    y.data_ptr() == x.data_ptr() ? with_residual(std::true_type{}) : with_residual(std::false_type{});
  });
}

at::Tensor bn_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, const std::string& activation) {
  at::Tensor y = at::empty_like(x);
  bn_act_into("fastres::_bn_act_cpu", x, scale, shift, residual, activation, y);
  return y;
}

void bn_act_cpu_(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                 const std::optional<at::Tensor>& residual, const std::string& activation) {
  bn_act_into("fastres::_bn_act_cpu_", x, scale, shift, residual, activation, x);
}

// The backward's per-element gz, from grad and (ReLU) the output `out` or the forward recomputed
// from x; s, b as in affine_run.
template <typename T, Act A, bool kOut>
inline acc_t<T> masked_grad(const T* grad, const T* x, const T* out, acc_t<T> s, acc_t<T> b, int64_t i) {
  using C = acc_t<T>;
  const C g = widen(grad[i]);
  if constexpr (A == Act::kIdentity) {
    return g;
  } else {
    const C y = kOut ? widen(out[i]) : widen(narrow<T>(widen(x[i]) * s + b));
    return y > C(0) ? g : C(0);
  }
}

// Elements per reduction block: a block's sums run in the compute dtype, the blocks' in fp64.
constexpr int64_t kBlock = 1 << 14;
// Lanes of an NCHW block's sums (independent accumulators the compiler keeps in vector registers).
constexpr int64_t kLanes = 32;

struct Sums {
  std::vector<double> sum, dot;  // per channel: sum gz, sum gz * (x - mean)
};

// The sums of channels_last rows [0, rows) (C = ch elements each) into sum[c], dot[c].
template <typename T, Act A, bool kOut>
FASTRES_CPU_CLONES void row_sums(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ out,
                                 const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift,
                                 const acc_t<T>* __restrict__ mean, int64_t rows, int64_t ch,
                                 acc_t<T>* __restrict__ sum, acc_t<T>* __restrict__ dot) {
  using C = acc_t<T>;
  std::fill(sum, sum + ch, C(0));
  std::fill(dot, dot + ch, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * ch;
    for (int64_t c = 0; c < ch; ++c) {
      const C gz = masked_grad<T, A, kOut>(grad + off, x + off, kOut ? out + off : out, scale[c], shift[c], c);
      sum[c] += gz;
      dot[c] += gz * (widen(x[off + c]) - mean[c]);
    }
  }
}

// The sums of one channel of an NCHW tensor, its n planes of hw elements `plane` apart: in kLanes
// accumulators (a plane's element i in lane i % kLanes), added to the fp64 sums after each
// kBlock elements or fewer.
template <typename T, Act A, bool kOut>
FASTRES_CPU_CLONES void channel_sums(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ out,
                                     acc_t<T> s, acc_t<T> b, acc_t<T> m, int64_t n, int64_t hw, int64_t plane,
                                     double* __restrict__ sum_out, double* __restrict__ dot_out) {
  using C = acc_t<T>;
  double ts = 0.0, td = 0.0;
  C sum[kLanes] = {}, dot[kLanes] = {};
  int64_t pending = 0;  // elements in the accumulators
  const auto flush = [&] {
    for (int64_t l = 0; l < kLanes; ++l) {
      ts += sum[l];
      td += dot[l];
      sum[l] = dot[l] = C(0);
    }
    pending = 0;
  };
  for (int64_t p = 0; p < n; ++p) {
    const T* gp = grad + p * plane;
    const T* xp = x + p * plane;
    const T* op = kOut ? out + p * plane : out;
    for (int64_t i0 = 0; i0 < hw; i0 += kBlock) {
      const int64_t i1 = std::min(hw, i0 + kBlock);
      if (pending + (i1 - i0) > kBlock) flush();
      int64_t i = i0;
      for (; i + kLanes <= i1; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const C gz = masked_grad<T, A, kOut>(gp, xp, op, s, b, i + l);
          sum[l] += gz;
          dot[l] += gz * (widen(xp[i + l]) - m);
        }
      }
      for (int64_t l = 0; i < i1; ++i, ++l) {
        const C gz = masked_grad<T, A, kOut>(gp, xp, op, s, b, i);
        sum[l] += gz;
        dot[l] += gz * (widen(xp[i]) - m);
      }
      pending += i1 - i0;
    }
  }
  flush();
  *sum_out = ts;
  *dot_out = td;
}

// The channels_last reductions' fixed blocks of rows (at most kBlock elements each, whatever the
// thread count): block(first row, rows, a, b) fills two per-channel vectors with the block's
// results, in parallel; then merge(rows, a, b) takes them block by block, in order.
template <typename C, typename Block, typename Merge>
void over_row_blocks(const Geometry& g, const Block& block, const Merge& merge) {
  const int64_t rows = g.n * g.hw, ch = g.c;
  const int64_t block_rows = std::max<int64_t>(1, kBlock / ch);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const auto size = [&](int64_t k) { return std::min(rows, (k + 1) * block_rows) - k * block_rows; };
  std::vector<C> part(blocks * 2 * ch);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) block(k * block_rows, size(k), &part[k * 2 * ch], &part[k * 2 * ch + ch]);
  });
  for (int64_t k = 0; k < blocks; ++k) merge(size(k), &part[k * 2 * ch], &part[k * 2 * ch + ch]);
}

template <typename T, Act A, bool kOut>
Sums reduce(const Geometry& g, const T* grad, const T* x, const T* out, const acc_t<T>* scale,
            const acc_t<T>* shift, const acc_t<T>* mean) {
  using C = acc_t<T>;
  const int64_t ch = g.c;
  Sums total{std::vector<double>(ch, 0.0), std::vector<double>(ch, 0.0)};
  if (g.channels_last) {
    over_row_blocks<C>(
        g,
        [&](int64_t r0, int64_t rows, C* sum, C* dot) {
          const int64_t off = r0 * ch;
          row_sums<T, A, kOut>(grad + off, x + off, kOut ? out + off : out, scale, shift, mean, rows, ch, sum, dot);
        },
        [&](int64_t, const C* sum, const C* dot) {
          for (int64_t c = 0; c < ch; ++c) {
            total.sum[c] += sum[c];
            total.dot[c] += dot[c];
          }
        });
    return total;
  }
  at::parallel_for(0, ch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t off = c * g.hw;
      channel_sums<T, A, kOut>(grad + off, x + off, kOut ? out + off : out, scale[c], shift[c], mean[c], g.n, g.hw,
                               ch * g.hw, &total.sum[c], &total.dot[c]);
    }
  });
  return total;
}

// One run's grad_x = (gz - gmean - (x - mean) * k) * s (and gz); rows and vectors as in affine_run.
// I: what gx is written over (Into), whose elements are each read before they are overwritten
// through gx (a pointer of their own would alias gx's; the other one is unused).
enum class Into { kNew, kGrad, kX };

template <typename T, Act A, bool kOut, bool kGradZ, bool kPlane, Into I>
FASTRES_CPU_CLONES void grad_run(const T* __restrict__ grad_in, const T* __restrict__ x_in, const T* __restrict__ out,
                                 T* __restrict__ gx, T* __restrict__ gzo, const acc_t<T>* __restrict__ scale,
                                 const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ mean,
                                 const acc_t<T>* __restrict__ gmean, const acc_t<T>* __restrict__ k, int64_t rows,
                                 int64_t n) {
  using C = acc_t<T>;
  const T* grad = I == Into::kGrad ? gx : grad_in;
  const T* x = I == Into::kX ? gx : x_in;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t o = row * n;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = kPlane ? 0 : i;
      const C gz = masked_grad<T, A, kOut>(grad + o, x + o, kOut ? out + o : out, scale[c], shift[c], i);
      gx[o + i] = narrow<T>((gz - gmean[c] - (widen(x[o + i]) - mean[c]) * k[c]) * scale[c]);
      if constexpr (kGradZ) gzo[o + i] = narrow<T>(gz);
    }
  }
}

template <typename T, Act A, bool kOut, bool kGradZ, Into I>
void grad_input(const Geometry& g, const T* grad, const T* x, const T* out, T* gx, T* gzo, const acc_t<T>* scale,
                const acc_t<T>* shift, const acc_t<T>* mean, const acc_t<T>* gmean, const acc_t<T>* k) {
  for_each_run(g, [&](int64_t off, int64_t rows, int64_t len, int64_t c) {
    const T* gr = I == Into::kGrad ? nullptr : grad + off;
    const T* xr = I == Into::kX ? nullptr : x + off;
    const T* o = kOut ? out + off : nullptr;
    T* z = kGradZ ? gzo + off : nullptr;
    if (c < 0) {
      grad_run<T, A, kOut, kGradZ, false, I>(gr, xr, o, gx + off, z, scale, shift, mean, gmean, k, rows, len);
    } else {
      grad_run<T, A, kOut, kGradZ, true, I>(gr, xr, o, gx + off, z, scale + c, shift + c, mean + c, gmean + c,
                                            k + c, rows, len);
    }
  });
}

template <typename T, Act A, bool kOut>
void train_backward(const Geometry& g, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
                    const at::Tensor& invstd, const at::Tensor& gx, const at::Tensor& gz,
                    const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  using C = acc_t<T>;
  const T* o = kOut ? data<T>(out) : nullptr;
  const Sums sums =
      reduce<T, A, kOut>(g, data<T>(grad), data<T>(x), o, data<C>(scale), data<C>(shift), data<C>(mean));
  const double m = static_cast<double>(g.n) * static_cast<double>(g.hw);
  const C* is = data<C>(invstd);
  std::vector<C> gmean(g.c), k(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    const double inv = is[c];
    gmean[c] = static_cast<C>(sums.sum[c] / m);
    k[c] = static_cast<C>(sums.dot[c] * inv * inv / m);
    data<C>(grad_weight)[c] = static_cast<C>(sums.dot[c] * inv);
    data<C>(grad_bias)[c] = static_cast<C>(sums.sum[c]);
  }
  const auto run = [&](auto grad_z, auto into) {
    grad_input<T, A, kOut, decltype(grad_z)::value, decltype(into)::value>(
        g, data<T>(grad), data<T>(x), o, data<T>(gx), grad_z ? data<T>(gz) : nullptr, data<C>(scale),
        data<C>(shift), data<C>(mean), gmean.data(), k.data());
  };
  const auto with_into = [&](auto grad_z) {
    if (gx.data_ptr() == grad.data_ptr()) return run(grad_z, std::integral_constant<Into, Into::kGrad>{});
    if (gx.data_ptr() == x.data_ptr()) return run(grad_z, std::integral_constant<Into, Into::kX>{});
    run(grad_z, std::integral_constant<Into, Into::kNew>{});
  };
  gz.numel() ? with_into(std::true_type{}) : with_into(std::false_type{});
}

// Checks the arguments and runs the backward, grad_x into gx (a fresh tensor, or grad or x
// itself: each of their elements is read before the one of gx at its index is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward_into(
    const char* op, const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
    const std::string& activation, bool grad_z, const at::Tensor& gx) {
  if (out) check_dense(op, "out", *out, x);
  check_vector(op, "scale", scale, x);
  check_vector(op, "shift", shift, x);
  check_vector(op, "mean", mean, x);
  check_vector(op, "invstd", invstd, x);
  const Act act = parse_activation(activation);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0, op, ": x: expected values in every channel");
  at::Tensor gz = grad_z ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_weight = at::empty_like(scale);
  at::Tensor grad_bias = at::empty_like(scale);
  const Geometry g = geometry(x);
  const at::Tensor none;
  dispatch_storage(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (act == Act::kIdentity) {
      train_backward<T, Act::kIdentity, false>(g, grad, x, none, scale, shift, mean, invstd, gx, gz, grad_weight,
                                               grad_bias);
    } else if (out) {
      train_backward<T, Act::kRelu, true>(g, grad, x, *out, scale, shift, mean, invstd, gx, gz, grad_weight,
                                          grad_bias);
    } else {
      train_backward<T, Act::kRelu, false>(g, grad, x, none, scale, shift, mean, invstd, gx, gz, grad_weight,
                                           grad_bias);
    }
  });
  return {grad_weight, grad_bias, gz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const std::optional<at::Tensor>& out, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd, const std::string& activation,
    bool grad_z) {
  constexpr const char* op = "fastres::_bn_act_train_backward_cpu";
  check_x(op, x);
  TORCH_CHECK(grad_in.sizes() == x.sizes() && grad_in.scalar_type() == x.scalar_type() && grad_in.device().is_cpu(),
              op, ": grad: expected a CPU tensor of x's dtype and shape");
  const at::Tensor grad = grad_in.contiguous(x.suggest_memory_format());
  at::Tensor gx = at::empty_like(x);
  auto [grad_weight, grad_bias, gz] =
      train_backward_into(op, grad, x, out, scale, shift, mean, invstd, activation, grad_z, gx);
  return {gx, grad_weight, grad_bias, gz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_cpu_(
    at::Tensor& grad, at::Tensor& x, const std::optional<at::Tensor>& out, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd, const std::string& activation,
    bool grad_z, bool over_x) {
  constexpr const char* op = "fastres::_bn_act_train_backward_cpu_";
  check_x(op, x);
  check_dense(op, "grad", grad, x);
  TORCH_CHECK(!(over_x && out && out->is_same(x)), op, ": out: expected a tensor other than x when over_x");
  return train_backward_into(op, grad, x, out, scale, shift, mean, invstd, activation, grad_z, over_x ? x : grad);
}

// Batch statistics: per channel, the mean and M2 = sum (x - mean)^2 of each block of at most
// kBlock elements in two passes over it (the second from cache), in the compute dtype; the
// blocks' merged in fp64 in a fixed order (Chan, Golub and LeVeque's pairwise update).
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;

  void merge(double nb, double mean_b, double m2_b) {
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

// The moments of channels_last rows [0, rows) (C = ch elements each): mean[c], m2[c].
template <typename T>
FASTRES_CPU_CLONES void row_moments(const T* __restrict__ x, int64_t rows, int64_t ch, acc_t<T>* __restrict__ mean,
                                    acc_t<T>* __restrict__ m2) {
  using C = acc_t<T>;
  std::fill(mean, mean + ch, C(0));
  std::fill(m2, m2 + ch, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ch; ++c) mean[c] += widen(x[r * ch + c]);
  }
  for (int64_t c = 0; c < ch; ++c) mean[c] = mean[c] / C(rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ch; ++c) {
      const C d = widen(x[r * ch + c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

// The moments of `segments` runs of len elements of one channel, `stride` apart (NCHW planes or
// a piece of one), in kLanes accumulators.
template <typename T>
FASTRES_CPU_CLONES void segment_moments(const T* __restrict__ x, int64_t segments, int64_t len, int64_t stride,
                                        double* __restrict__ mean_out, double* __restrict__ m2_out) {
  using C = acc_t<T>;
  C acc[kLanes] = {};
  for (int64_t p = 0; p < segments; ++p) {
    const T* xp = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += widen(xp[i + l]);
    }
    for (int64_t l = 0; i < len; ++i, ++l) acc[l] += widen(xp[i]);
  }
  C total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  const C mean = total / C(segments * len);
  std::fill(acc, acc + kLanes, C(0));
  for (int64_t p = 0; p < segments; ++p) {
    const T* xp = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const C d = widen(xp[i + l]) - mean;
        acc[l] += d * d;
      }
    }
    for (int64_t l = 0; i < len; ++i, ++l) {
      const C d = widen(xp[i]) - mean;
      acc[l] += d * d;
    }
  }
  C m2 = 0;
  for (int64_t l = 0; l < kLanes; ++l) m2 += acc[l];
  *mean_out = mean;
  *m2_out = m2;
}

template <typename T>
std::vector<Moments> moments(const Geometry& g, const T* x) {
  using C = acc_t<T>;
  const int64_t ch = g.c;
  std::vector<Moments> total(ch);
  if (g.channels_last) {
    over_row_blocks<C>(
        g, [&](int64_t r0, int64_t rows, C* mean, C* m2) { row_moments<T>(x + r0 * ch, rows, ch, mean, m2); },
        [&](int64_t rows, const C* mean, const C* m2) {
          for (int64_t c = 0; c < ch; ++c) total[c].merge(static_cast<double>(rows), mean[c], m2[c]);
        });
    return total;
  }
  // pieces: whole planes, as many as fit in a block, or a block of one plane
  const int64_t planes = g.hw <= kBlock ? std::max<int64_t>(1, kBlock / std::max<int64_t>(g.hw, 1)) : 1;
  at::parallel_for(0, ch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t p = 0; p < g.n; p += planes) {
        const int64_t np = std::min(planes, g.n - p);
        for (int64_t i0 = 0; i0 < g.hw; i0 += kBlock) {
          const int64_t len = std::min(kBlock, g.hw - i0);
          double mean = 0.0, m2 = 0.0;
          segment_moments<T>(x + (p * ch + c) * g.hw + i0, np, len, ch * g.hw, &mean, &m2);
          total[c].merge(static_cast<double>(np * len), mean, m2);
        }
      }
    }
  });
  return total;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, double momentum) {
  constexpr const char* op = "fastres::_bn_stats_cpu";
  check_x(op, x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean, running_var: expected both or neither");
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK(count > 0, op, ": x: expected values in every channel");
  if (running_mean) {
    check_vector(op, "running_mean", *running_mean, x);
    check_vector(op, "running_var", *running_var, x);
    TORCH_CHECK(count > 1, op, ": x: expected more than 1 value per channel to update the running variance");
  }
  const auto ct = compute_type(x);
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(ct));
  at::Tensor var = at::empty({x.size(1)}, x.options().dtype(ct));
  const Geometry g = geometry(x);
  dispatch_storage(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = acc_t<T>;
    const std::vector<Moments> m = moments<T>(g, data<T>(x));
    const double n = static_cast<double>(count);
    for (int64_t c = 0; c < g.c; ++c) {
      data<C>(mean)[c] = static_cast<C>(m[c].mean);
      data<C>(var)[c] = static_cast<C>(m[c].m2 / n);
      if (running_mean) {  // nn.BatchNorm2d's update, with the unbiased variance
        C& rm = data<C>(*running_mean)[c];
        C& rv = data<C>(*running_var)[c];
        rm = static_cast<C>(momentum * m[c].mean + (1.0 - momentum) * rm);
        rv = static_cast<C>(momentum * (m[c].m2 / (n - 1.0)) + (1.0 - momentum) * rv);
      }
    }
  });
  return {mean, var};
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("_bn_act_cpu", &fastres::bn_act_cpu);
  m.impl("_bn_act_cpu_", &fastres::bn_act_cpu_);
  m.impl("_bn_act_train_backward_cpu", &fastres::bn_act_train_backward_cpu);
  m.impl("_bn_act_train_backward_cpu_", &fastres::bn_act_train_backward_cpu_);
  m.impl("_bn_stats_cpu", &fastres::bn_stats_cpu);
}
