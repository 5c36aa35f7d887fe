// See solve_checks.h.
#include "solve_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>

namespace pcdeq::cpu {
namespace {

// Rows of a batch as consecutive blocks of memory: contiguous, or channels-last (the sample is the
// outermost dimension in both); anything else is copied once.
at::Tensor rows_in_order(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return t;
  }
  return t.contiguous();
}

// Calls f(data, rows, row_length) with t's entries as float or double (float16/bfloat16 converted to
// float on the way: a lossless widening, so the comparisons are those of the stored values).
template <class F>
void visit_rows(const at::Tensor& t, const F& f) {
  const at::Tensor rows = rows_in_order(t);
  const int64_t count = rows.dim() == 0 ? 1 : rows.size(0);
  const int64_t length = count == 0 ? 0 : rows.numel() / count;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "pcdeq_solve_checks", [&] {
    f(rows.const_data_ptr<scalar_t>(), count, length);
  });
}

template <typename T>
float widen(T x) {
  return static_cast<float>(x);
}
inline double widen(double x) { return x; }

// Whether every entry is finite and >= 0; with `rows_positive`, also whether every row has an entry > 0.
bool nonnegative_and_finite(const at::Tensor& t, bool rows_positive) {
  bool ok = true;
  visit_rows(t, [&](const auto* data, int64_t rows, int64_t length) {
    for (int64_t r = 0; r < rows && ok; ++r) {
      const auto* row = data + r * length;
      using Wide = decltype(widen(row[0]));
      // (ints and no short-circuit: the form the compiler vectorizes)
      int out_of_range = 0;
      int any_positive = 0;
      for (int64_t i = 0; i < length; ++i) {
        const Wide x = widen(row[i]);
        // !(x >= 0) holds for NaN and negatives (-0.0 passes), x > max for +inf
        out_of_range |= !(x >= Wide(0)) | (x > std::numeric_limits<Wide>::max());
        any_positive |= x > Wide(0);
      }
      ok = !out_of_range && (!rows_positive || any_positive);
    }
  });
  return ok;
}

}  // namespace

bool inputs_are_valid(const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& z0,
                      bool nonzero_rows) {
  for (const at::Tensor* t : {&u, &weight}) {
    TORCH_CHECK(t->device().is_cpu(), "pcdeq_C::inputs_are_valid: expected CPU tensors, got one on ", t->device());
  }
  if (!nonnegative_and_finite(weight, false) || !nonnegative_and_finite(u, nonzero_rows && u.size(0) > 0)) {
    return false;
  }
  return !z0.has_value() || nonnegative_and_finite(*z0, false);
}

int64_t solve_report(const at::Tensor& state, const at::Tensor& converged, const at::Tensor& residual, double tol,
                     double eps) {
  TORCH_CHECK(state.device().is_cpu() && converged.device().is_cpu() && residual.device().is_cpu(),
              "pcdeq_C::solve_report: expected CPU tensors");
  TORCH_CHECK(converged.scalar_type() == at::kBool && converged.dim() == 1 && residual.dim() == 1 &&
                  state.dim() >= 1 && converged.size(0) == state.size(0) && residual.size(0) == state.size(0),
              "pcdeq_C::solve_report: expects the state (B, ...), converged bool (B,) and residual (B,) of one solve");
  const at::Tensor flags = converged.contiguous();
  const at::Tensor res = residual.to(at::kDouble).contiguous();  // (B,): a negligible copy
  const bool* conv = flags.const_data_ptr<bool>();
  const double* r = res.const_data_ptr<double>();
  int64_t report = 0;
  visit_rows(state, [&](const auto* data, int64_t rows, int64_t length) {
    for (int64_t b = 0; b < rows; ++b) {
      if (!conv[b]) {
        report |= kSomeUnconverged;
        continue;
      }
      if (!(r[b] > 0) || (report & kGuardDecided)) {
        continue;  // a zero step is exact whatever the norm
      }
      // n * (tol - r) <= r * eps, i.e. (for r < tol) n <= limit: the sum of squares stops as soon as
      // it passes limit^2, which for a state of any ordinary size is within its first entries.
      bool guard = true;
      if (tol > r[b]) {
        const double limit = r[b] * eps / (tol - r[b]);
        const double limit_sq = limit * limit;
        double norm_sq = 0.0;
        const auto* row = data + b * length;
        for (int64_t i = 0; i < length && norm_sq <= limit_sq; ++i) {
          const double x = widen(row[i]);
          norm_sq += x * x;
        }
        guard = std::sqrt(norm_sq) <= limit;
      }
      if (guard) {
        report |= kGuardDecided;
      }
    }
  });
  return report;
}

}  // namespace pcdeq::cpu
