// The pcDEQ activations: scalar math shared by the CPU backend (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/).
//
// One source of truth is pcdeq_kernels/activations.py; the ids (enum Activation, kNumActivations,
// kAdjoint and the list PCDEQ_FOR_EACH_ACTIVATION) come from pcdeq/map_ids.h, which
// scripts/generate_map_ids.py writes from that table. Formulas, as there:
//
//     id  name      act(x)                 act'(x)
//     0   tanh      tanh(x)                1 - tanh(x)^2
//     1   softsign  x / (1 + |x|)          1 / (1 + |x|)^2
//     2   relu6     min(max(x, 0), 6)      1 if 0 < x < 6 else 0   (0 at the kinks, as torch autograd)
//     3   sigmoid   1 / (1 + exp(-x))      s(x) (1 - s(x))
//
// Adding an activation: its table entry (then regenerate map_ids.h) and one branch in each of
// activation<> and activation_derivative<> below. An id without a branch there is a compile-time
// error wherever it is instantiated, and every runtime dispatch over ids (visit_activation) is
// generated from PCDEQ_FOR_EACH_ACTIVATION, so no call site is missed. (The CPU backend's SIMD
// versions in csrc/cpu/vec_activations.h fall back to these scalar formulas lane by lane.)
//
// Everything is `PCDEQ_HOST_DEVICE` so CUDA code can call it from kernels; on the host it is plain
// inline C++. `T` is float or double.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <pcdeq/map_ids.h>

#if defined(__CUDACC__)
#define PCDEQ_HOST_DEVICE __host__ __device__
// Before a __host__ __device__ template that calls its argument: the call is checked in the space the
// instantiation runs in (host code passes host lambdas, device code device ones), not in both.
#define PCDEQ_CALLS_ANY_SPACE _Pragma("nv_exec_check_disable")
#else
#define PCDEQ_HOST_DEVICE
#define PCDEQ_CALLS_ANY_SPACE
#endif

namespace pcdeq {

// false for every id, but only once ACT is known: the last branch of a compile-time dispatch.
template <int ACT>
inline constexpr bool kNoFormulaFor = false;

// 1 / (1 + exp(-x)), evaluated from e = exp(-|x|) <= 1 so that nothing overflows: for x < 0 it is
// e / (1 + e), which keeps full relative accuracy deep into the left tail (where 1 / (1 + exp(-x))
// would give 1 / inf = 0).
template <typename T>
PCDEQ_HOST_DEVICE inline T sigmoid(T x) {
  using std::exp;
  using std::fabs;
  const T e = exp(-fabs(x));
  const T s = T(1) / (T(1) + e);
  return x < T(0) ? e * s : s;
}

// act(x) for a compile-time activation: what fused kernels instantiate.
template <int ACT, typename T>
PCDEQ_HOST_DEVICE inline T activation(T x) {
  using std::fabs;
  using std::tanh;
  if constexpr (ACT == TANH) {
    return tanh(x);
  } else if constexpr (ACT == SOFTSIGN) {
    return x / (T(1) + fabs(x));
  } else if constexpr (ACT == RELU6) {
    // Written so that NaN propagates (NaN compares false both times), like torch's clamp.
    return x < T(0) ? T(0) : (x > T(6) ? T(6) : x);
  } else if constexpr (ACT == SIGMOID) {
    return sigmoid(x);
  } else {
    static_assert(kNoFormulaFor<ACT>, "pcdeq::activation: no formula for this activation id (add its branch)");
    return x;
  }
}

// act'(x) for a compile-time activation, at the pre-activation x.
template <int ACT, typename T>
PCDEQ_HOST_DEVICE inline T activation_derivative(T x) {
  using std::fabs;
  using std::tanh;
  if constexpr (ACT == TANH) {
    const T t = tanh(x);
    return T(1) - t * t;
  } else if constexpr (ACT == SOFTSIGN) {
    const T s = T(1) + fabs(x);
    return T(1) / (s * s);
  } else if constexpr (ACT == RELU6) {
    return (x > T(0) && x < T(6)) ? T(1) : T(0);
  } else if constexpr (ACT == SIGMOID) {
    const T s = sigmoid(x);
    return s * (T(1) - s);
  } else {
    static_assert(kNoFormulaFor<ACT>, "pcdeq::activation_derivative: no formula for this activation id (add its branch)");
    return x;
  }
}

// Runtime id -> compile-time id: calls f(std::integral_constant<int, ID>{}) for the activation whose
// id is `id` and returns true; for any other id (kAdjoint included) calls nothing and returns false.
// One case per PCDEQ_FOR_EACH_ACTIVATION entry: the one switch over activation ids.
PCDEQ_CALLS_ANY_SPACE
template <class F>
PCDEQ_HOST_DEVICE inline bool visit_activation(int64_t id, F&& f) {
  switch (id) {
#define PCDEQ_VISIT_ACTIVATION_CASE(NAME, ID) \
  case ID:                                    \
    f(std::integral_constant<int, ID>{});     \
    return true;
    PCDEQ_FOR_EACH_ACTIVATION(PCDEQ_VISIT_ACTIVATION_CASE)
#undef PCDEQ_VISIT_ACTIVATION_CASE
    default:
      return false;  // not an activation: nothing is computed
  }
}

// The same over every map id a solve iterates: the activations, and kAdjoint for the adjoint map.
PCDEQ_CALLS_ANY_SPACE
template <class F>
PCDEQ_HOST_DEVICE inline bool visit_map(int64_t id, F&& f) {
  if (id == kAdjoint) {
    f(std::integral_constant<int, kAdjoint>{});
    return true;
  }
  return visit_activation(id, f);
}

}  // namespace pcdeq
