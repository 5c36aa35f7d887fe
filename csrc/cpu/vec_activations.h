// SIMD versions of the activations in pcdeq/activations.h, for the CPU solver's fused pass.
//
// Built on ATen's at::vec::Vectorized<T>, so they use whatever instruction set the extension is
// compiled for (setup.py: AVX2 or AVX-512 when the build machine has it, else ATen's portable
// fallback). Same formulas as the scalar header, with one exception that matters for speed:
// float tanh. Sleef's tanhf (what Vectorized<float>::tanh calls) costs about half as much per
// iteration as the matmul at the paper's size, so float tanh is evaluated here from exp or a short
// series, at a maximum error of 2 ulp (tests/test_backend_cpu.py measures it against float64). The
// exp is Sleef's expf algorithm written out in Vectorized operations, so that it inlines: a call
// into Sleef makes the compiler spill every live vector register around it (inlining took ~10% off
// a whole float32 solve at the paper's size on one Zen 5 core). Near a fixed point the series is
// rarely needed and is skipped for a vector whose lanes are all past its range.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include <pcdeq/activations.h>

namespace pcdeq::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Taylor coefficients of tanh x = sum_n c_n x^(2n+1), c_n = 2^(2n+2) (2^(2n+2) - 1) B_(2n+2) / (2n+2)!
// (B_k the Bernoulli numbers): 1, -1/3, 2/15, -17/315, 62/2835, ...
constexpr float kTanhTaylor[] = {
    1.0f,
    -1.0f / 3.0f,
    2.0f / 15.0f,
    -17.0f / 315.0f,
    62.0f / 2835.0f,
    -1382.0f / 155925.0f,
    21844.0f / 6081075.0f,
    -929569.0f / 638512875.0f,
    6404582.0f / 10854718875.0f,
};
// Below this |x| the series (9 terms, through x^17) is used; its truncation error there is
// c_9 |x|^18 < 2.4e-4 * 0.625^18 < 1e-7 relative. Above it, exp(-2|x|) <= 0.29 keeps 1 - exp(-2|x|)
// free of cancellation. Both branches stay within 2 ulp.
constexpr float kTanhSeriesBound = 0.625f;

// exp(x) for x in [-80, 0] (NaN gives NaN): Sleef's expf_u10 algorithm (1 ulp), written out so that
// it inlines into the fused pass (a call to Sleef forces every live vector register to be spilled
// around it). x = q ln2 + s with |s| <= ln2 / 2 (ln2 split in two for an exact reduction), exp(s) by
// its minimax polynomial, times 2^q made directly in the exponent bits: q + 127 is in [12, 127], so
// 2^q is a normal float and (q + 127) 2^23 an exact integer.
inline Vec<float> exp_nonpositive(const Vec<float>& x) {
  using V = Vec<float>;
  const V q = (x * V(1.442695040888963407359924681001892137f)).round();
  V s = at::vec::fmadd(q, V(-0.693145751953125f), x);
  s = at::vec::fmadd(q, V(-1.428606765330187045e-06f), s);
  V u(0.000198527617612853646278381f);
  u = at::vec::fmadd(u, s, V(0.00139304355252534151077271f));
  u = at::vec::fmadd(u, s, V(0.00833336077630519866943359f));
  u = at::vec::fmadd(u, s, V(0.0416664853692054748535156f));
  u = at::vec::fmadd(u, s, V(0.166666671633720397949219f));
  u = at::vec::fmadd(u, s, V(0.5f));
  u = at::vec::fmadd(s * s, u, s + V(1.0f));
  const V two_q = at::vec::cast<float>(at::vec::convert_to_int_of_same_size<float>((q + V(127.0f)) * V(8388608.0f)));
  return u * two_q;
}

inline Vec<float> tanh_float(const Vec<float>& x) {
  using V = Vec<float>;
  const V ax = x.abs();
  // |x| >= 0.625: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 0.29], then the sign of x.
  // Beyond |x| = 40, e < 2^-115 and the quotient rounds to 1 either way: the argument is clamped
  // there (clamp_min(a, m) is max(m, a), which returns a when a is NaN; NaN then propagates).
  const V e = exp_nonpositive(at::vec::clamp_min(ax * V(-2.0f), V(-80.0f)));
  const V magnitude = (V(1.0f) - e) / (V(1.0f) + e);
  const V large = magnitude | (x & V(-0.0f));
  const V small = ax < V(kTanhSeriesBound);
  if (small.zero_mask() == (1 << V::size()) - 1) {
    return large;  // no lane needs the series: the common case near a fixed point (pre-activations > 0.625)
  }
  // |x| < 0.625: x * P(x^2) by Horner's rule; odd, so the sign comes out right by itself.
  const V x2 = x * x;
  V p(kTanhTaylor[8]);
  for (int k = 7; k >= 0; --k) {
    p = at::vec::fmadd(p, x2, V(kTanhTaylor[k]));
  }
  return V::blendv(large, x * p, small);
}

// act(x) on a vector, for a compile-time activation id. An activation with a SIMD formula has its
// branch here; any other one (a new table entry needs none) takes the last branch, which applies the
// scalar formula of pcdeq/activations.h lane by lane: correct and as accurate as the scalar code,
// only slower. So adding an activation needs its scalar formula only; a SIMD branch is an
// optimisation (tests/test_backend_cpu.py measures every activation's accuracy either way).
template <int ACT, typename T>
inline Vec<T> activation_vec(const Vec<T>& x) {
  using V = Vec<T>;
  if constexpr (ACT == TANH) {
    if constexpr (std::is_same_v<T, float>) {
      return tanh_float(x);
    } else {
      return x.tanh();  // Sleef, 1 ulp: float64 is the accuracy path, not the fast one
    }
  } else if constexpr (ACT == SOFTSIGN) {
    return x / (V(T(1)) + x.abs());
  } else if constexpr (ACT == RELU6) {
    return at::vec::clamp(x, V(T(0)), V(T(6)));  // propagates NaN, like torch.clamp
  } else if constexpr (ACT == SIGMOID) {  // as in the scalar header: from e = exp(-|x|), so nothing overflows
    const V e = x.abs().neg().exp();
    const V s = V(T(1)) / (V(T(1)) + e);
    return V::blendv(s, e * s, x < V(T(0)));
  } else {
    return x.map(activation<ACT, T>);  // no SIMD formula: the scalar one per lane
  }
}

// act'(x) on a vector, for a compile-time activation id: the scalar header's formulas, tanh's and
// sigmoid's from activation_vec above; any other activation takes the scalar formula lane by lane.
template <int ACT, typename T>
inline Vec<T> activation_derivative_vec(const Vec<T>& x) {
  using V = Vec<T>;
  if constexpr (ACT == TANH) {
    const V t = activation_vec<ACT, T>(x);
    return V(T(1)) - t * t;
  } else if constexpr (ACT == SOFTSIGN) {
    const V s = V(T(1)) + x.abs();
    return V(T(1)) / (s * s);
  } else if constexpr (ACT == RELU6) {
    return (x > V(T(0))) & (x < V(T(6))) & V(T(1));  // 0 at the kinks and for NaN, as the scalar formula
  } else if constexpr (ACT == SIGMOID) {
    const V s = activation_vec<ACT, T>(x);
    return s * (V(T(1)) - s);
  } else {
    return x.map(activation_derivative<ACT, T>);
  }
}

}  // namespace pcdeq::cpu
