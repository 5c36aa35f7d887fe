// CUDA kernels for dense pcDEQ solves (u, v of shape (B, d), weight (d, d)); host code in dense_solve.cuh.
//
// Both maps are one matmul plus an elementwise epilogue:
//
//     forward   x_next = act(x @ M + u)        M = W^T
//     adjoint   x_next = D * (x @ M + v)       M = W
//
// M is passed as a zero-padded (dp, dp) row-major matrix (dp = d rounded up to 16) in the operand
// type, and every state buffer has dp columns whose padding stays 0, so no tile needs a bounds check
// in its K loop. Rows are independent: a row's output depends on that row of x only, so rows that
// have stopped may keep stale values in the operand buffers (their outputs are simply not written).
//
// Matmul engines (the template parameter E):
//   Tf32Engine         fp32 state, tf32 tensor cores (wmma m16n16k8), fp32 accumulation
//   HalfEngine<H>      fp32 master state plus a copy in H (half or bfloat16) as the matmul operand,
//                      tensor cores (wmma m16n16k16), fp32 accumulation
//   SimtEngine<S>      CUDA cores in S (float for torch's "highest" fp32 precision, or double)
// WMMA rather than CUTLASS/CuTe: no extra dependency, it builds with the toolkit alone, and at these
// sizes (d up to a few thousand, the paper's d = 80) the solve is bound by latency and L2 traffic,
// not by the last 2x of tensor-core throughput a tuned CUTLASS mainloop would add.
//
// Kernels:
//   dense_solve_block_kernel  one launch solves everything: a CTA owns 16 rows, keeps their state in
//                             shared memory (fp32 master, ping-pong, plus the operand copy) and
//                             iterates until all its rows stopped or max_iter; W streams from L2.
//   dense_step_kernel         one step on a 64 x 64 output tile (stepwise path, large d, batch rule):
//                             x_next = epilogue(x @ M), per-row squared residual/norm atomics.
//   dense_finalize_kernel     after each step: per-row counts, residuals, stop flags, active count.
//   dense_gather_kernel       the final state: row b lives in buffer (iterations[b] & 1).
//
// Residuals (pcdeq_kernels/reference.py): a row's ||x_next - x||^2 and ||x_next||^2 are summed in
// double whatever the state type (a float state's squares cannot overflow there), the ratio is taken
// in double and rounded to the state type, NaN when a sum is not finite; a row whose residual is not
// finite stops at once, unconverged (with the batch rule: the whole batch, when the batch ratio is
// not finite).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <pcdeq/activations.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "pcdeq_kernels' CUDA kernels need sm_80 or newer (tf32/bf16 tensor cores): set TORCH_CUDA_ARCH_LIST to 8.0 or newer"
#endif

namespace pcdeq::cuda {

namespace wmma = nvcuda::wmma;

// Epilogue ids (MODE) are the map ids of pcdeq/map_ids.h: an activation id (>= 0) for the forward
// map act(acc + u), pcdeq::kAdjoint (< 0) for the adjoint map D * (acc + v).
// The official code's denominator guard (pcdeq_kernels.reference.RESIDUAL_EPS).
constexpr double kResidualEps = 1e-5;

// Single-launch solve: rows per CTA (the WMMA M dimension) and at most this many warps.
constexpr int kBlockRows = 16;
constexpr int kMaxBlockWarps = 8;
// Stepwise path: output tile and threads of the step kernel; threads of the finalize kernel.
constexpr int kStepBM = 64;
constexpr int kStepBN = 64;
constexpr int kStepThreads = 128;
constexpr int kFinalizeThreads = 512;
// Every dimension is padded to a multiple of this.
constexpr int kPad = 16;

// --- matmul engines ---------------------------------------------------------------------------------

struct Tf32Engine {
  using State = float;
  using Operand = float;  // raw fp32 in memory, rounded to tf32 (round to nearest) in the fragments
  static constexpr bool kTensorCores = true;
  static constexpr bool kSeparateOperand = false;  // the fp32 master state is the operand
  static constexpr int kK = 8;
  static constexpr int kStepBK = 32;
  static constexpr int kStepPadA = 4;  // smem row padding (elements): ld stays a multiple of 16 bytes
  static constexpr int kStepPadB = 4;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <class Frag>
  static __device__ __forceinline__ void prepare(Frag& f) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) {
      f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }
  static __device__ __forceinline__ Operand to_operand(float x) { return x; }
};

template <typename H>
struct HalfEngine {
  static_assert(std::is_same_v<H, __half> || std::is_same_v<H, __nv_bfloat16>, "half or bfloat16");
  using State = float;
  using Operand = H;
  static constexpr bool kTensorCores = true;
  static constexpr bool kSeparateOperand = true;  // fp32 master state + its H copy for the matmul
  static constexpr int kK = 16;
  static constexpr int kStepBK = 32;
  static constexpr int kStepPadA = 8;
  static constexpr int kStepPadB = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, H, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, H, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <class Frag>
  static __device__ __forceinline__ void prepare(Frag&) {}
  static __device__ __forceinline__ Operand to_operand(float x) {
    if constexpr (std::is_same_v<H, __half>) {
      return __float2half_rn(x);
    } else {
      return __float2bfloat16_rn(x);
    }
  }
};

template <typename S>
struct SimtEngine {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "float or double");
  using State = S;
  using Operand = S;
  static constexpr bool kTensorCores = false;
  static constexpr bool kSeparateOperand = false;
  static constexpr int kK = 1;
  static constexpr int kStepBK = sizeof(S) == 8 ? 16 : 32;
  static constexpr int kStepPadA = sizeof(S) == 8 ? 2 : 4;
  static constexpr int kStepPadB = sizeof(S) == 8 ? 2 : 4;
  static __device__ __forceinline__ Operand to_operand(S x) { return x; }
};

// --- shared math --------------------------------------------------------------------------------------

// ||x_next - x|| / (||x_next|| + 1e-5) from the squared norms (summed in double), in double and
// rounded to the state type S, as the reference; NaN when a sum is not finite (a non-finite iterate,
// or a double state beyond 1e154): never a spurious 0 from finite / inf.
template <typename S>
__device__ __forceinline__ S relative_residual(double sq_diff, double sq_norm) {
  if (!isfinite(sq_diff) || !isfinite(sq_norm)) {
    return static_cast<S>(NAN);
  }
  // IEEE sqrt and division (correctly rounded) unless built with --use_fast_math, which we do not
  return static_cast<S>(sqrt(sq_diff) / (sqrt(sq_norm) + kResidualEps));
}

// The stopping rule on a residual r (a row's, or the batch's): r < tol converged; not finite: stopped,
// unconverged (a non-finite iterate is never iterated on); else another step.
enum class Verdict { kGoOn, kConverged, kNonFinite };

template <typename S>
__device__ __forceinline__ Verdict verdict(S r, S tol) {
  if (r < tol) {
    return Verdict::kConverged;
  }
  return isfinite(r) ? Verdict::kGoOn : Verdict::kNonFinite;
}

// x^2 in double, exactly for a float x.
template <typename S>
__device__ __forceinline__ double square(S x) {
  const double w = static_cast<double>(x);
  return w * w;
}

// The map's epilogue on one element: act(acc + u) forward, D * (acc + v) adjoint.
template <int MODE, typename S>
__device__ __forceinline__ S epilogue_value(S acc, S side0, S side1) {
  if constexpr (MODE == kAdjoint) {
    return side1 * (acc + side0);
  } else {
    return pcdeq::activation<MODE, S>(acc + side0);
  }
}

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// --- the single-launch solve kernel -------------------------------------------------------------------

template <class E>
struct BlockParams {
  using S = typename E::State;
  using Op = typename E::Operand;
  int batch, d, dp;
  const Op* __restrict__ m;      // (dp, dp) zero padded
  const S* __restrict__ side0;   // (B, d): u or v
  const S* __restrict__ side1;   // (B, d): D (adjoint), else null
  const S* __restrict__ x0;      // (B, d): the initial state
  S* __restrict__ out;           // (B, d): the final state
  int* __restrict__ iterations;  // (B,)
  S* __restrict__ residual;      // (B,)
  bool* __restrict__ converged;  // (B,)
  S tol;
  int max_iter;
  bool batch_stop;  // only with a single CTA (B <= 16): its rows are the whole batch
};

// Shared memory of dense_solve_block_kernel for dp columns and `warps` warps (host and device agree).
//   x      [2][16][ldx] State   the master state, ping-pong: step k reads buffer k&1, writes the other
//   op     [2][16][ldo] Operand its operand copy (HalfEngine only; else the master is the operand)
//   stage  [warps][16*16] State one warp's accumulator tile, for the epilogue
//   sq     [16][2] double       per-row sum of squared differences / squared next values
//   res    [16] State, its [16] int, active [16] int (1 active, 0 converged, -1 stopped unconverged),
//   done int (the batch rule was met)
template <class E>
struct BlockLayout {
  using S = typename E::State;
  using Op = typename E::Operand;
  // +4 floats (+8 halves) per row: a multiple of 16 bytes as WMMA wants, and rows start in
  // different banks
  int ldx, ldo;
  size_t off_op, off_stage, off_sq, off_res, off_its, off_active, off_done, bytes;

  static __host__ __device__ constexpr size_t align(size_t n) { return (n + 127) / 128 * 128; }

  __host__ __device__ BlockLayout(int dp, int warps) {
    ldx = dp + 4;
    ldo = E::kSeparateOperand ? dp + static_cast<int>(16 / sizeof(Op)) : ldx;
    size_t at = align(sizeof(S) * 2 * kBlockRows * ldx);
    off_op = at;
    if (E::kSeparateOperand) {
      at += align(sizeof(Op) * 2 * kBlockRows * ldo);
    }
    off_stage = at;
    at += align(sizeof(S) * warps * 256);
    off_sq = at;
    at += align(sizeof(double) * kBlockRows * 2);
    off_res = at;
    at += align(sizeof(S) * kBlockRows);
    off_its = at;
    at += align(sizeof(int) * kBlockRows);
    off_active = at;
    at += align(sizeof(int) * kBlockRows);
    off_done = at;
    at += align(sizeof(int));
    bytes = at;
  }
};

// One warp: stage[16][16] = a[16][dp] @ m[:, n0:n0+16] (a in shared memory, m streamed from global/L2).
template <class E>
__device__ __forceinline__ void block_tile_product(
    const typename E::Operand* a, int lda, const typename E::Operand* __restrict__ m, int dp, int n0,
    typename E::State* stage, int lane) {
  if constexpr (E::kTensorCores) {
    // two accumulators: consecutive k steps do not wait on each other's mma
    typename E::FragC acc0, acc1;
    wmma::fill_fragment(acc0, 0.0f);
    wmma::fill_fragment(acc1, 0.0f);
    int k = 0;
    for (; k + 2 * E::kK <= dp; k += 2 * E::kK) {
      typename E::FragA fa0, fa1;
      typename E::FragB fb0, fb1;
      wmma::load_matrix_sync(fa0, a + k, lda);
      wmma::load_matrix_sync(fb0, m + static_cast<size_t>(k) * dp + n0, dp);
      wmma::load_matrix_sync(fa1, a + k + E::kK, lda);
      wmma::load_matrix_sync(fb1, m + static_cast<size_t>(k + E::kK) * dp + n0, dp);
      E::prepare(fa0);
      E::prepare(fb0);
      E::prepare(fa1);
      E::prepare(fb1);
      wmma::mma_sync(acc0, fa0, fb0, acc0);
      wmma::mma_sync(acc1, fa1, fb1, acc1);
    }
    if (k < dp) {
      typename E::FragA fa;
      typename E::FragB fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, m + static_cast<size_t>(k) * dp + n0, dp);
      E::prepare(fa);
      E::prepare(fb);
      wmma::mma_sync(acc0, fa, fb, acc0);
    }
#pragma unroll
    for (int i = 0; i < acc0.num_elements; ++i) {
      acc0.x[i] += acc1.x[i];
    }
    wmma::store_matrix_sync(stage, acc0, 16, wmma::mem_row_major);
  } else {
    // lane: column n0 + (lane & 15), rows (lane >> 4) + 2 i
    using S = typename E::State;
    const int c = lane & 15;
    const int r0 = lane >> 4;
    S acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      acc[i] = S(0);
    }
    const S* __restrict__ col = m + n0 + c;
    const S* row = a + r0 * lda;
#pragma unroll 4
    for (int k = 0; k < dp; ++k) {
      const S b = __ldg(col + static_cast<size_t>(k) * dp);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[i] = fma(row[2 * i * lda + k], b, acc[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      stage[(r0 + 2 * i) * 16 + c] = acc[i];
    }
  }
}

template <class E, int MODE>
__global__ void __launch_bounds__(kMaxBlockWarps * 32, 1) dense_solve_block_kernel(const BlockParams<E> p) {
  using S = typename E::State;
  using Op = typename E::Operand;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warps = blockDim.x >> 5;
  const BlockLayout<E> L(p.dp, warps);
  S* xs = reinterpret_cast<S*>(smem);
  Op* xo = E::kSeparateOperand ? reinterpret_cast<Op*>(smem + L.off_op) : reinterpret_cast<Op*>(smem);
  S* stage_all = reinterpret_cast<S*>(smem + L.off_stage);
  double* sq = reinterpret_cast<double*>(smem + L.off_sq);
  S* res_s = reinterpret_cast<S*>(smem + L.off_res);
  int* its_s = reinterpret_cast<int*>(smem + L.off_its);
  int* active_s = reinterpret_cast<int*>(smem + L.off_active);
  int* done_s = reinterpret_cast<int*>(smem + L.off_done);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int d = p.d;
  const int dp = p.dp;
  const int ldx = L.ldx;
  const int ldo = L.ldo;
  const int row0 = blockIdx.x * kBlockRows;
  const int rows = min(kBlockRows, p.batch - row0);
  const int x_buf = kBlockRows * ldx;  // elements per ping-pong buffer
  const int o_buf = kBlockRows * ldo;

  // state and operand buffers: zero (padding columns and missing rows stay 0), then x0 into buffer 0
  for (int i = tid; i < 2 * x_buf; i += blockDim.x) {
    xs[i] = S(0);
  }
  if constexpr (E::kSeparateOperand) {
    for (int i = tid; i < 2 * o_buf; i += blockDim.x) {
      xo[i] = E::to_operand(0.0f);
    }
  }
  __syncthreads();
  for (int i = tid; i < rows * d; i += blockDim.x) {
    const int r = i / d;
    const int j = i - r * d;
    const S v = p.x0[static_cast<size_t>(row0 + r) * d + j];
    xs[r * ldx + j] = v;
    if constexpr (E::kSeparateOperand) {
      xo[r * ldo + j] = E::to_operand(v);
    }
  }
  if (tid < kBlockRows) {
    sq[2 * tid] = 0.0;
    sq[2 * tid + 1] = 0.0;
    its_s[tid] = 0;
    res_s[tid] = S(INFINITY);
    active_s[tid] = tid < rows;
  }
  if (tid == 0) {
    *done_s = 0;
  }
  __syncthreads();

  const int tiles = dp / 16;
  S* stage = stage_all + warp * 256;
  // epilogue ownership within a 16 x 16 tile: row lr, columns c0 .. c0 + 7
  const int lr = lane >> 1;
  const int c0 = (lane & 1) * 8;
  const size_t grow = static_cast<size_t>(row0 + lr);

  bool any_active = true;  // rows >= 1 always
  for (int it = 0; any_active && it < p.max_iter; ++it) {
    const int cur = it & 1;
    const S* x_cur = xs + cur * x_buf;
    S* x_next = xs + (cur ^ 1) * x_buf;
    const Op* a_cur = xo + cur * o_buf;
    Op* o_next = xo + (cur ^ 1) * o_buf;

    for (int t = warp; t < tiles; t += warps) {
      const int n0 = t * 16;
      block_tile_product<E>(a_cur, ldo, p.m, dp, n0, stage, lane);
      __syncwarp();
      double sd = 0.0;
      double sn = 0.0;
      const bool row_active = active_s[lr] > 0;
      if (row_active) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int j = n0 + c0 + e;
          if (j < d) {
            const size_t g = grow * d + j;
            const S side1 = MODE == kAdjoint ? p.side1[g] : S(0);
            const S next = epilogue_value<MODE, S>(stage[lr * 16 + c0 + e], p.side0[g], side1);
            const S diff = next - x_cur[lr * ldx + j];  // in S, as the reference
            sd += square(diff);
            sn += square(next);
            x_next[lr * ldx + j] = next;
            if constexpr (E::kSeparateOperand) {
              o_next[lr * ldo + j] = E::to_operand(next);
            }
          }
        }
      }
      sd += __shfl_xor_sync(0xffffffffu, sd, 1);
      sn += __shfl_xor_sync(0xffffffffu, sn, 1);
      if (row_active && (lane & 1) == 0) {
        atomicAdd(&sq[2 * lr], sd);
        atomicAdd(&sq[2 * lr + 1], sn);
      }
      __syncwarp();  // the stage tile is reused by this warp's next tile
    }
    __syncthreads();

    // the stopping rule, one lane per row (warp 0)
    if (warp == 0) {
      const bool mine = lane < kBlockRows;
      const bool act = mine && active_s[lane] > 0;
      const double sd = mine ? sq[2 * lane] : 0.0;
      const double sn = mine ? sq[2 * lane + 1] : 0.0;
      const S r = relative_residual<S>(sd, sn);
      Verdict v = verdict(r, p.tol);
      if (p.batch_stop) {  // the CTA's rows are the whole batch: its ratio decides for all of them
        v = verdict(relative_residual<S>(warp_sum(sd), warp_sum(sn)), p.tol);
        if (v == Verdict::kConverged && lane == 0) {
          *done_s = 1;
        }
      }
      if (act) {
        its_s[lane] += 1;
        res_s[lane] = r;
        if (v != Verdict::kGoOn) {
          active_s[lane] = v == Verdict::kConverged ? 0 : -1;
        }
      }
      if (mine) {
        sq[2 * lane] = 0.0;
        sq[2 * lane + 1] = 0.0;
      }
    }
    any_active = __syncthreads_or(tid < kBlockRows && active_s[tid] > 0) != 0;
  }

  // a row's state is in the buffer its iteration count points at
  for (int i = tid; i < rows * d; i += blockDim.x) {
    const int r = i / d;
    const int j = i - r * d;
    p.out[static_cast<size_t>(row0 + r) * d + j] = xs[(its_s[r] & 1) * x_buf + r * ldx + j];
  }
  if (tid < rows) {
    p.iterations[row0 + tid] = its_s[tid];
    p.residual[row0 + tid] = res_s[tid];
    p.converged[row0 + tid] = p.batch_stop ? (*done_s != 0) : (active_s[tid] == 0);
  }
}

// --- the stepwise path ----------------------------------------------------------------------------------

template <class E>
struct StepParams {
  using S = typename E::State;
  using Op = typename E::Operand;
  int batch, d, dp;
  const Op* __restrict__ m;       // (dp, dp)
  const Op* a;                    // (B, dp): the current state as matmul operand (= x_cur unless separate)
  const S* x_cur;                 // (B, dp)
  S* x_next;                      // (B, dp)
  Op* op_next;                    // (B, dp): operand copy of x_next (HalfEngine), else null
  const S* __restrict__ side0;    // (B, d)
  const S* __restrict__ side1;    // (B, d) or null
  const uint8_t* __restrict__ active;  // (B,)
  double* sums;                   // (B, 2): sum of squared differences, of squared next values
  const int* num_active;          // (1,): 0 once every row stopped
};

template <class E>
struct StepLayout {
  using S = typename E::State;
  using Op = typename E::Operand;
  static constexpr int BK = E::kStepBK;
  static constexpr int LDA = BK + E::kStepPadA;
  static constexpr int LDB = kStepBN + E::kStepPadB;
  static constexpr int LDC = kStepBN + (sizeof(S) == 8 ? 2 : 4);
  static constexpr size_t kA = sizeof(Op) * kStepBM * LDA;  // one buffer
  static constexpr size_t kB = sizeof(Op) * BK * LDB;
  static constexpr size_t kTiles = 2 * (kA + kB);
  static constexpr size_t kC = sizeof(S) * kStepBM * LDC;
  static constexpr size_t kBytes = kTiles > kC ? kTiles : kC;  // C reuses the tiles' space
  static_assert((LDA * sizeof(Op)) % 16 == 0 && (LDB * sizeof(Op)) % 16 == 0, "16-byte rows");
  static_assert(kA % 128 == 0 && kB % 128 == 0, "aligned buffers");
};

template <class E, int MODE>
__global__ void __launch_bounds__(kStepThreads) dense_step_kernel(const StepParams<E> p) {
  using S = typename E::State;
  using Op = typename E::Operand;
  using Lay = StepLayout<E>;
  constexpr int BM = kStepBM;
  constexpr int BN = kStepBN;
  constexpr int BK = Lay::BK;
  constexpr int LDA = Lay::LDA;
  constexpr int LDB = Lay::LDB;
  constexpr int LDC = Lay::LDC;
  constexpr int kVec = 16 / sizeof(Op);  // elements per 16-byte load
  constexpr int kAVecs = BM * BK / kVec / kStepThreads;
  constexpr int kBVecs = BK * BN / kVec / kStepThreads;
  static_assert(kAVecs * kVec * kStepThreads == BM * BK && kBVecs * kVec * kStepThreads == BK * BN, "tiling");

  __shared__ __align__(128) unsigned char smem[Lay::kBytes];
  __shared__ int active_s[BM];

  if (*p.num_active == 0) {
    return;  // the solve has finished; the host loop only learns it at its next read
  }
  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  int mine = 0;
  if (tid < BM) {
    mine = (m0 + tid < p.batch) ? p.active[m0 + tid] : 0;
    active_s[tid] = mine;
  }
  if (!__syncthreads_or(mine)) {
    return;  // every row of this tile has stopped
  }

  Op* As = reinterpret_cast<Op*>(smem);
  Op* Bs = reinterpret_cast<Op*>(smem + 2 * Lay::kA);
  const int dp = p.dp;

  uint4 ra[kAVecs];
  uint4 rb[kBVecs];
  auto load_global = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kAVecs; ++i) {
      const int v = tid + i * kStepThreads;
      const int row = v / (BK / kVec);
      const int col = (v % (BK / kVec)) * kVec;
      const int gr = m0 + row;
      const int gk = k0 + col;
      ra[i] = (gr < p.batch && gk < dp)
          ? *reinterpret_cast<const uint4*>(p.a + static_cast<size_t>(gr) * dp + gk)
          : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kBVecs; ++i) {
      const int v = tid + i * kStepThreads;
      const int row = v / (BN / kVec);
      const int col = (v % (BN / kVec)) * kVec;
      const int gk = k0 + row;
      const int gn = n0 + col;
      rb[i] = (gk < dp && gn < dp)
          ? __ldg(reinterpret_cast<const uint4*>(p.m + static_cast<size_t>(gk) * dp + gn))
          : make_uint4(0, 0, 0, 0);
    }
  };
  auto store_shared = [&](int buf) {
    Op* as = As + buf * (BM * LDA);
    Op* bs = Bs + buf * (BK * LDB);
#pragma unroll
    for (int i = 0; i < kAVecs; ++i) {
      const int v = tid + i * kStepThreads;
      const int row = v / (BK / kVec);
      const int col = (v % (BK / kVec)) * kVec;
      *reinterpret_cast<uint4*>(as + row * LDA + col) = ra[i];
    }
#pragma unroll
    for (int i = 0; i < kBVecs; ++i) {
      const int v = tid + i * kStepThreads;
      const int row = v / (BN / kVec);
      const int col = (v % (BN / kVec)) * kVec;
      *reinterpret_cast<uint4*>(bs + row * LDB + col) = rb[i];
    }
  };

  const int k_tiles = (dp + BK - 1) / BK;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  S* Cs = reinterpret_cast<S*>(smem);

  if constexpr (E::kTensorCores) {
    // 4 warps in 2 x 2, each 32 x 32 = 2 x 2 fragments
    const int wm = warp >> 1;
    const int wn = warp & 1;
    typename E::FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fill_fragment(acc[i][j], 0.0f);
      }
    }
    load_global(0);
    store_shared(0);
    __syncthreads();
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < k_tiles) {
        load_global((kt + 1) * BK);  // in flight while this tile is multiplied
      }
      const Op* as = As + buf * (BM * LDA);
      const Op* bs = Bs + buf * (BK * LDB);
#pragma unroll
      for (int kk = 0; kk < BK; kk += E::kK) {
        typename E::FragA fa[2];
        typename E::FragB fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * LDA + kk, LDA);
          E::prepare(fa[i]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(fb[j], bs + kk * LDB + wn * 32 + j * 16, LDB);
          E::prepare(fb[j]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
          }
        }
      }
      if (kt + 1 < k_tiles) {
        store_shared(buf ^ 1);
      }
      __syncthreads();
    }
    // the tiles are dead (last barrier above): the output tile takes their place
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
      }
    }
  } else {
    // thread (ty, tx): rows ty + 8 i (i < 8), columns tx + 16 j (j < 4)
    const int ty = tid >> 4;
    const int tx = tid & 15;
    S acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = S(0);
      }
    }
    load_global(0);
    store_shared(0);
    __syncthreads();
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < k_tiles) {
        load_global((kt + 1) * BK);
      }
      const S* as = As + buf * (BM * LDA);
      const S* bs = Bs + buf * (BK * LDB);
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        S a[8];
        S b[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          a[i] = as[(ty + 8 * i) * LDA + kk];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          b[j] = bs[kk * LDB + tx + 16 * j];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[i][j] = fma(a[i], b[j], acc[i][j]);
          }
        }
      }
      if (kt + 1 < k_tiles) {
        store_shared(buf ^ 1);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        Cs[(ty + 8 * i) * LDC + tx + 16 * j] = acc[i][j];
      }
    }
  }
  __syncthreads();

  // epilogue: a warp per row (coalesced), rows that stopped are left alone
  const int d = p.d;
  for (int r = warp; r < BM; r += kStepThreads / 32) {
    if (!active_s[r]) {
      continue;  // uniform across the warp
    }
    const size_t gr = static_cast<size_t>(m0 + r);
    double sd = 0.0;
    double sn = 0.0;
#pragma unroll
    for (int c = lane; c < BN; c += 32) {
      const int j = n0 + c;
      if (j < d) {
        const size_t g = gr * d + j;
        const S side1 = MODE == kAdjoint ? p.side1[g] : S(0);
        const S next = epilogue_value<MODE, S>(Cs[r * LDC + c], p.side0[g], side1);
        const size_t x = gr * dp + j;
        const S diff = next - p.x_cur[x];  // in S, as the reference
        sd += square(diff);
        sn += square(next);
        p.x_next[x] = next;
        if constexpr (E::kSeparateOperand) {
          p.op_next[x] = E::to_operand(next);
        }
      }
    }
    sd = warp_sum(sd);
    sn = warp_sum(sn);
    if (lane == 0) {
      atomicAdd(&p.sums[2 * gr], sd);
      atomicAdd(&p.sums[2 * gr + 1], sn);
    }
  }
}

// After a step: rows still active count the step and take its residual; under the per-sample rule a
// row stops when its residual is below tol (converged) or not finite (unconverged); the batch rule
// stops all rows at once when the batch ratio is (converged) or is not finite (unconverged). Writes
// the number of active rows.
template <typename S>
__global__ void __launch_bounds__(kFinalizeThreads) dense_finalize_kernel(
    int batch, double* __restrict__ sums, uint8_t* __restrict__ active, int* __restrict__ iterations,
    S* __restrict__ residual, bool* __restrict__ converged, S tol, bool batch_stop, int* num_active) {
  __shared__ double red_d[kFinalizeThreads / 32];
  __shared__ double red_n[kFinalizeThreads / 32];
  __shared__ int red_a[kFinalizeThreads / 32];
  __shared__ int verdict_s;  // the batch rule's Verdict
  if (*num_active == 0) {
    return;  // nothing ran in the step before
  }
  const int tid = threadIdx.x;
  double total_d = 0.0;
  double total_n = 0.0;
  int alive = 0;
  for (int b = tid; b < batch; b += blockDim.x) {
    if (!active[b]) {
      continue;
    }
    double* row_sums = sums + 2 * static_cast<size_t>(b);
    const double sd = row_sums[0];
    const double sn = row_sums[1];
    row_sums[0] = 0.0;
    row_sums[1] = 0.0;
    const S r = relative_residual<S>(sd, sn);
    iterations[b] += 1;
    residual[b] = r;
    total_d += sd;
    total_n += sn;
    const Verdict v = batch_stop ? Verdict::kGoOn : verdict(r, tol);
    if (v == Verdict::kGoOn) {
      ++alive;
    } else {
      active[b] = 0;
      converged[b] = v == Verdict::kConverged;
    }
  }
  // block reduction of the totals and the count
  total_d = warp_sum(total_d);
  total_n = warp_sum(total_n);
  alive = warp_sum(alive);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if (lane == 0) {
    red_d[warp] = total_d;
    red_n[warp] = total_n;
    red_a[warp] = alive;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    total_d = lane < warps ? red_d[lane] : 0.0;
    total_n = lane < warps ? red_n[lane] : 0.0;
    alive = lane < warps ? red_a[lane] : 0;
    total_d = warp_sum(total_d);
    total_n = warp_sum(total_n);
    alive = warp_sum(alive);
    if (lane == 0) {
      const Verdict v = batch_stop ? verdict(relative_residual<S>(total_d, total_n), tol) : Verdict::kGoOn;
      verdict_s = static_cast<int>(v);
      *num_active = v == Verdict::kGoOn ? alive : 0;
    }
  }
  __syncthreads();
  if (verdict_s != static_cast<int>(Verdict::kGoOn)) {
    const bool met = verdict_s == static_cast<int>(Verdict::kConverged);
    for (int b = tid; b < batch; b += blockDim.x) {
      active[b] = 0;
      converged[b] = met;
    }
  }
}

// out (B, d) <- row b of buffer (iterations[b] & 1), both (B, dp).
template <typename S>
__global__ void dense_gather_kernel(
    int batch, int d, int dp, const S* __restrict__ x0, const S* __restrict__ x1, const int* __restrict__ iterations,
    S* __restrict__ out) {
  const size_t total = static_cast<size_t>(batch) * d;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t b = i / d;
    const size_t j = i - b * d;
    const S* src = (iterations[b] & 1) ? x1 : x0;
    out[i] = src[b * dp + j];
  }
}

}  // namespace pcdeq::cuda
