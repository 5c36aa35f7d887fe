// Dense solvers, fp16 tensor cores (fp32 master state). One file per engine so that builds compile them in parallel.
#include "dense_solve_impl.cuh"

namespace pcdeq::cuda {

SolveOutputs solve_dense_f16(const DenseProblem& problem) {
  return solve_dense<HalfEngine<__half>>(problem);
}

}  // namespace pcdeq::cuda
