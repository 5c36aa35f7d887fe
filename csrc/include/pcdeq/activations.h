// The pcDEQ activations: scalar math shared by the CPU backend and (later) CUDA kernels.
//
// One source of truth is pcdeq_kernels/activations.py; the ids below are its `kernel_id`s (a test
// parses this file and checks they agree). Formulas, as there:
//
//     id  name      act(x)                 act'(x)
//     0   tanh      tanh(x)                1 - tanh(x)^2
//     1   softsign  x / (1 + |x|)          1 / (1 + |x|)^2
//     2   relu6     min(max(x, 0), 6)      1 if 0 < x < 6 else 0   (0 at the kinks, as torch autograd)
//     3   sigmoid   1 / (1 + exp(-x))      s(x) (1 - s(x))
//
// Everything is `PCDEQ_HOST_DEVICE` so CUDA code can call it from kernels; on the host it is plain
// inline C++. `T` is float or double.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PCDEQ_HOST_DEVICE __host__ __device__
#else
#define PCDEQ_HOST_DEVICE
#endif

namespace pcdeq {

enum Activation : int {
  TANH = 0,
  SOFTSIGN = 1,
  RELU6 = 2,
  SIGMOID = 3,
};

constexpr int kNumActivations = 4;

PCDEQ_HOST_DEVICE constexpr bool is_valid_activation(int id) {
  return 0 <= id && id < kNumActivations;
}

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
  static_assert(is_valid_activation(ACT), "unknown pcDEQ activation id");
  if constexpr (ACT == TANH) {
    return tanh(x);
  } else if constexpr (ACT == SOFTSIGN) {
    return x / (T(1) + fabs(x));
  } else if constexpr (ACT == RELU6) {
    // Written so that NaN propagates (NaN compares false both times), like torch's clamp.
    return x < T(0) ? T(0) : (x > T(6) ? T(6) : x);
  } else {
    return sigmoid(x);
  }
}

// act'(x) for a compile-time activation, at the pre-activation x.
template <int ACT, typename T>
PCDEQ_HOST_DEVICE inline T activation_derivative(T x) {
  using std::fabs;
  using std::tanh;
  static_assert(is_valid_activation(ACT), "unknown pcDEQ activation id");
  if constexpr (ACT == TANH) {
    const T t = tanh(x);
    return T(1) - t * t;
  } else if constexpr (ACT == SOFTSIGN) {
    const T s = T(1) + fabs(x);
    return T(1) / (s * s);
  } else if constexpr (ACT == RELU6) {
    return (x > T(0) && x < T(6)) ? T(1) : T(0);
  } else {
    const T s = sigmoid(x);
    return s * (T(1) - s);
  }
}

// Runtime-id versions, for code that does not specialise on the activation.
template <typename T>
PCDEQ_HOST_DEVICE inline T activation(int id, T x) {
  switch (id) {
    case TANH: return activation<TANH>(x);
    case SOFTSIGN: return activation<SOFTSIGN>(x);
    case RELU6: return activation<RELU6>(x);
    default: return activation<SIGMOID>(x);
  }
}

template <typename T>
PCDEQ_HOST_DEVICE inline T activation_derivative(int id, T x) {
  switch (id) {
    case TANH: return activation_derivative<TANH>(x);
    case SOFTSIGN: return activation_derivative<SOFTSIGN>(x);
    case RELU6: return activation_derivative<RELU6>(x);
    default: return activation_derivative<SIGMOID>(x);
  }
}

}  // namespace pcdeq
