// The fused per-sample update shared by the CPU solve loops (dense: solver.cpp, conv: conv_solver.cpp).
//
// Both maps are "a linear map, then an elementwise epilogue, then a per-sample residual":
//
//     forward   x_next = act(acc + u)          acc = L(x)     (z @ W^T, or conv3x3(z, W))
//     adjoint   x_next = D * (acc + v)         acc = L^T(x)   (h @ W, or conv_transpose3x3(h, W))
//
// update_row() applies the epilogue to one contiguous run of a sample's entries (a dense row, or a
// slice of a channels-last image), writes x_next over x, and returns the run's ||x_next - x||^2 and
// ||x_next||^2 (accumulated in double: a float state's squares cannot overflow there); the loops sum
// those per sample and judge relative_residual() with verdict().
#pragma once

#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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

// The sum of a double vector's lanes. (ATen's vec_reduce_all has shuffle versions for float only; its
// generic one, a store and reload per lane, twice a row, added 4 us to a 9 us float32 step of the
// paper's size, B=64, d=80.)
inline double sum_lanes(const Vec<double>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_pd(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256d x = v;
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
#else
  __at_align__ double lanes[Vec<double>::size()];
  v.store(lanes);
  double sum = 0.0;
  for (int64_t i = 0; i < Vec<double>::size(); ++i) {
    sum += lanes[i];
  }
  return sum;
#endif
}

// A float vector as two double vectors (its low and high halves), exactly.
inline void widen(const Vec<float>& v, Vec<double>& lo, Vec<double>& hi) {
  static_assert(Vec<float>::size() == 2 * Vec<double>::size(), "a float vector is two double vectors");
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
#else
  __at_align__ float f[Vec<float>::size()];
  __at_align__ double w[Vec<float>::size()];
  v.store(f);
  for (int64_t i = 0; i < Vec<float>::size(); ++i) {
    w[i] = f[i];
  }
  lo = Vec<double>::loadu(w);
  hi = Vec<double>::loadu(w + Vec<double>::size());
#endif
}

// Per-lane sums of squares in double (the reference sums the squares in float64: for a float state
// they then cannot overflow, squares staying below 1.2e77). A double state's vectors are squared and
// summed as they are; a float state's are widened to double first, half a vector at a time.
template <typename T>
class SquareSums {
 public:
  // next: x_next, change: x_next - x
  void add(const Vec<T>& next, const Vec<T>& change) {
    if constexpr (std::is_same_v<T, double>) {
      diff_[0] = at::vec::fmadd(change, change, diff_[0]);
      norm_[0] = at::vec::fmadd(next, next, norm_[0]);
    } else {
      Vec<double> next_lo, next_hi, diff_lo, diff_hi;
      widen(next, next_lo, next_hi);
      widen(change, diff_lo, diff_hi);
      diff_[0] = at::vec::fmadd(diff_lo, diff_lo, diff_[0]);
      diff_[1] = at::vec::fmadd(diff_hi, diff_hi, diff_[1]);
      norm_[0] = at::vec::fmadd(next_lo, next_lo, norm_[0]);
      norm_[1] = at::vec::fmadd(next_hi, next_hi, norm_[1]);
    }
  }
  double diff() const { return sum_lanes(diff_[0] + diff_[1]); }
  double norm() const { return sum_lanes(norm_[0] + norm_[1]); }

 private:
  // [1]: a float state's high halves (a double state leaves it 0)
  Vec<double> diff_[2] = {Vec<double>(0.0), Vec<double>(0.0)};
  Vec<double> norm_[2] = {Vec<double>(0.0), Vec<double>(0.0)};
};

// The fused pass on one row of length d: x <- Step(acc, rows); returns ||x_next - x||^2 and
// ||x_next||^2 through the last two arguments. The difference is taken in T, as the reference does;
// its square and the next value's accumulate in double (SquareSums). A row's last, partial vector
// goes through the same SIMD math with masked loads and stores.
template <class Step, typename T>
inline void update_row(const T* acc, T* x, const T* const* rows, int64_t d, double* sq_diff, double* sq_norm) {
  using V = Vec<T>;
  SquareSums<T> sums;
  int64_t j = 0;
  for (; j + V::size() <= d; j += V::size()) {
    const V next = Step::template vec<T>(V::loadu(acc + j), rows, j, V::size());
    sums.add(next, next - V::loadu(x + j));
    next.store(x + j);
  }
  if (j < d) {
    const int64_t count = d - j;
    // lanes past the row's end hold act(0) (sigmoid: 1/2): zero them before they enter the norms
    const V next = V::set(V(T(0)), Step::template vec<T>(V::loadu(acc + j, count), rows, j, count), count);
    sums.add(next, next - V::loadu(x + j, count));
    next.store(x + j, count);
  }
  *sq_diff = sums.diff();
  *sq_norm = sums.norm();
}

// ||x_next - x|| / (||x_next|| + 1e-5) in double, rounded to the state dtype as the reference computes
// it; NaN when a sum is not finite (a non-finite iterate, or a double state beyond 1e154): never a
// spurious 0 from finite / inf. (Rounding a finite ratio to float may still give inf.)
template <typename T>
T relative_residual(double sq_diff, double sq_norm) {
  if (!std::isfinite(sq_diff) || !std::isfinite(sq_norm)) {
    return std::numeric_limits<T>::quiet_NaN();
  }
  return static_cast<T>(std::sqrt(sq_diff) / (std::sqrt(sq_norm) + kResidualEps));
}

// What the stopping rule makes of a step's residual r (a sample's, or the batch's under the batch
// rule): converged when r < tol; stopped unconverged when r is not finite (NaN or Inf: a non-finite
// iterate is never iterated on); else another step.
enum class Verdict { kGoOn, kConverged, kNonFinite };

template <typename T>
Verdict verdict(T r, T tol) {
  if (r < tol) {
    return Verdict::kConverged;
  }
  return std::isfinite(r) ? Verdict::kGoOn : Verdict::kNonFinite;
}

// f(ForwardStep<ACT>{}) with the activation id as a compile-time constant, f's result returned (one
// instantiation per activation of the table: pcdeq::dispatch_map_id); an unknown id is an error.
template <class F>
auto with_forward_step(int64_t activation, F&& f) {
  return dispatch_map_id</*kWithAdjoint=*/false>(
      "pcdeq cpu", activation, [&](auto act) { return f(ForwardStep<decltype(act)::value>{}); });
}

}  // namespace pcdeq::cpu
