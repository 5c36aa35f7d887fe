// The fused per-sample update shared by the CPU solve loops (dense: solver.cpp, conv: conv_solver.cpp).
//
// Both maps are "a linear map, then an elementwise epilogue, then a per-sample residual":
//
//     forward   x_next = act(acc + u)          acc = L(x)     (z @ W^T, or conv3x3(z, W))
//     adjoint   x_next = D * (acc + v)         acc = L^T(x)   (h @ W, or conv_transpose3x3(h, W))
//
// update_row() applies the epilogue to one contiguous run of a sample's entries (a dense row, or a
// slice of a channels-last image), writes x_next over x, and returns the run's ||x_next - x||^2 and
// ||x_next||^2; the loops sum those per sample and compare relative_residual() with tol.
#pragma once

#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <cstdint>

#include <pcdeq/activations.h>
#include <pcdeq/op_checks.h>

#include "vec_activations.h"

namespace pcdeq::cpu {

// The official code's denominator guard (pcdeq_kernels.reference.RESIDUAL_EPS).
constexpr double kResidualEps = 1e-5;

// The two maps as epilogues of the matmul, on `count` entries from column j (count < the vector
// width only at a row's end: the loads then fill the other lanes with 0). `rows` holds the row's
// side inputs.
template <int ACT>
struct ForwardStep {  // x_next = act(acc + u)
  static constexpr int kInputs = 1;  // u
  template <typename T>
  static Vec<T> vec(const Vec<T>& acc, const T* const* rows, int64_t j, int64_t count) {
    return activation_vec<ACT, T>(acc + Vec<T>::loadu(rows[0] + j, count));
  }
};

struct AdjointStep {  // x_next = D * (acc + v)
  static constexpr int kInputs = 2;  // v, D
  template <typename T>
  static Vec<T> vec(const Vec<T>& acc, const T* const* rows, int64_t j, int64_t count) {
    return Vec<T>::loadu(rows[1] + j, count) * (acc + Vec<T>::loadu(rows[0] + j, count));
  }
};

// The sum of a vector's lanes (by shuffles on AVX2/AVX-512 float: ATen's reduction). GCC 12 warns
// about an uninitialised operand inside the AVX-512 shuffle intrinsic ATen uses: a false positive
// (the intrinsic's unused masked-off source), silenced here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
template <typename T>
double sum_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
}

// The fused pass on one row of length d: x <- Step(acc, rows); returns ||x_next - x||^2 and
// ||x_next||^2 through the last two arguments. The difference is taken in T, as the reference does;
// the squares accumulate in T, per SIMD lane and then across lanes. A row's last, partial vector
// goes through the same SIMD math with masked loads and stores.
template <class Step, typename T>
inline void update_row(const T* acc, T* x, const T* const* rows, int64_t d, double* sq_diff, double* sq_norm) {
  using V = Vec<T>;
  V lane_diff(T(0));
  V lane_norm(T(0));
  auto accumulate = [&](const V& next, const V& diff) {
    lane_diff = at::vec::fmadd(diff, diff, lane_diff);
    lane_norm = at::vec::fmadd(next, next, lane_norm);
  };
  int64_t j = 0;
  for (; j + V::size() <= d; j += V::size()) {
    const V next = Step::template vec<T>(V::loadu(acc + j), rows, j, V::size());
    accumulate(next, next - V::loadu(x + j));
    next.store(x + j);
  }
  if (j < d) {
    const int64_t count = d - j;
    // lanes past the row's end hold act(0) (sigmoid: 1/2): zero them before they enter the norms
    const V next = V::set(V(T(0)), Step::template vec<T>(V::loadu(acc + j, count), rows, j, count), count);
    accumulate(next, next - V::loadu(x + j, count));
    next.store(x + j, count);
  }
  *sq_diff = sum_lanes(lane_diff);
  *sq_norm = sum_lanes(lane_norm);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ||x_next - x|| / (||x_next|| + 1e-5), rounded to the state dtype as the reference computes it.
template <typename T>
T relative_residual(double sq_diff, double sq_norm) {
  return static_cast<T>(std::sqrt(sq_diff) / (std::sqrt(sq_norm) + kResidualEps));
}

// f(ForwardStep<ACT>{}) with the activation id as a compile-time constant, f's result returned (one
// instantiation per activation of the table: pcdeq::dispatch_map_id); an unknown id is an error.
template <class F>
auto with_forward_step(int64_t activation, F&& f) {
  return dispatch_map_id</*kWithAdjoint=*/false>(
      "pcdeq cpu", activation, [&](auto act) { return f(ForwardStep<decltype(act)::value>{}); });
}

}  // namespace pcdeq::cpu
