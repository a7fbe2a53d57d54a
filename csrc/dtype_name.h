// csrc/dtype_name.h — the Python name of a dtype ("float32", ...), as the argument
// messages of every compiled op spell it (csrc/cpu/, csrc/cuda/host_utils.h), like
// fastres/_checks.py's.
#pragma once

#include <c10/core/ScalarType.h>

namespace fastres {

inline const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return "float32";
    case c10::kHalf:
      return "float16";
    case c10::kBFloat16:
      return "bfloat16";
    case c10::kDouble:
      return "float64";
    default:
      return c10::toString(t);
  }
}

}  // namespace fastres
