// Convolutional pcDEQ solves on CUDA: pcdeq_C::forward_solve / adjoint_solve for a nonnegative 3x3
// kernel W of shape (C, C, 3, 3) (padding 1) and states of shape (B, C, H, W):
//
//     forward   z_{k+1} = act(conv2d(z_k, W, padding=1) + u)                 z_0 = z0 or 0
//     adjoint   h_{k+1} = D * (conv_transpose2d(h_k, W, padding=1) + v)      h_0 = D * v
//
// with the semantics of pcdeq_kernels/reference.py (iterate()): per-image residual
// r_b = ||x_next_b - x_b|| / (||x_next_b|| + 1e-5), the squared norms summed in double, NaN when a sum
// is not finite; "sample" rule (batch_stop = false): image b freezes (state, count and residual stop
// changing) once r_b < tol (converged) or once r_b is not finite (unconverged); "batch" rule: all
// images stop together once the whole-batch ratio is below tol (converged) or not finite
// (unconverged); at most max_iter steps. Returns (state in the input's dtype and memory format, iterations int32 (B,), residual
// (B,) float32 (float64 for float64 inputs), converged bool (B,)).
//
// One step = one cuDNN convolution + one fused epilogue kernel:
//
// * Layout. Every image is one contiguous block of n = C*H*W elements in all the solver's buffers
//   (the state, the convolution's output, u / v, D), so the epilogue is a per-image elementwise pass
//   whatever the element order inside an image. float32/float16/bfloat16 use NHWC (channels last):
//   cuDNN's fast layout for tensor-core convolutions; float64 uses NCHW, because torch never runs
//   float64 convolutions in NHWC (cudnn_conv_suggest_memory_format) and would convert every step.
//   Buffers are (B, n) row tensors; the convolution sees them through a (B, C, H, W) view with the
//   layout's strides, and its output is forced into the same layout (a no-op when cuDNN ran).
//
// * Convolution: at::conv2d, so torch's settings apply as to any torch convolution: cuDNN (or torch's
//   fallback when cuDNN is disabled), its algorithm choice (torch.backends.cudnn.benchmark), and for
//   float32 its TF32 setting for convolutions (torch.backends.cudnn.allow_tf32, default on, or the
//   newer fp32_precision settings): with TF32 on, the solve is TF32-accurate exactly as
//   F.conv2d (and so the reference backend) is. The adjoint runs conv2d with the kernel flipped and
//   transposed, W'[i, o] = flip(W[o, i]), built once per solve: the same map as
//   conv_transpose2d(h, W, padding=1), through the forward-convolution kernels cuDNN tunes most.
//   float16 / bfloat16 inputs are solved in float32 as the reference solves them: the state is an
//   fp32 master copy, and the convolution takes it rounded to the input dtype (W is already in it),
//   accumulating in fp32 on tensor cores (torch asks cuDNN for fp32 compute on half inputs); its
//   output is rounded to the input dtype once more. The epilogue adds u (exact in fp32), applies the
//   activation in fp32 and keeps the fp32 master; so the solve differs from the reference's fp32
//   iteration by input-dtype roundings of the state and of the convolution's output (a few units
//   of the half dtype's roundoff, amplified by at most 1 / (1 - c): tests/test_backend_cuda_conv.py).
//   (An adjoint with |h| beyond the half dtype's range would overflow in that operand; through
//   pcdeq_kernels.fixed_point the adjoint is always called with float32 or float64 tensors.)
//
// * Epilogue (conv_epilogue_kernel): one launch per step over (images of the working set) x (chunks
//   of 2048 elements), 256 threads, 8 elements per thread loaded before any is used (memory-level
//   parallelism). It computes x_next = act(y + u) (or D * (y + v)), writes the next state in place
//   over the old one (the convolution has consumed it) plus the half-precision operand copy, and
//   reduces ||x_next - x||^2 and ||x_next||^2 per image, in double, in two deterministic levels: a block tree
//   into a per-(image, chunk) partial, then the last block of the image to arrive (an atomic ticket
//   per image) sums the partials in a fixed order, computes r_b and updates the image's count,
//   residual and active flag, and (sample rule) converged flag and the device's active count. Under
//   the batch rule, the last image to finish (a second ticket) sums the per-image totals in a fixed
//   order and sets the whole-batch ratio, and when it is below tol marks every image converged and
//   the active count 0. No floating-point atomics: results are bitwise reproducible run to run.
//   A block whose image is frozen returns at once, so a frozen image's state, count and residual
//   never change again, even while its image is still in the convolution's batch between two host
//   checks; once the active count is 0 every block returns at once.
//
// * Host checks. The host never waits for the GPU inside a step. It copies a status block (active
//   count, per-image residuals and flags, the batch ratio) to pinned memory and synchronizes the
//   stream only at check steps. PCDEQ_CUDA_CHECK_EVERY=k checks every k steps. By default ("auto")
//   the schedule is adaptive: a first check after 4 steps, then the residuals predict the step at
//   which the slowest active image (or the batch ratio) reaches tol by geometric extrapolation
//   (rate = this step's residual over the previous step's), and the next check is made there, but
//   never more than 8 steps later. Steps enqueued after everything stopped cost one convolution
//   each and change nothing (the epilogue returns at once).
//
// * Compaction ("sample" rule). At a check, when the active images would fit in a batch at most 3/4
//   of the current working set, the working set is rebuilt with only them: the working state is
//   written back to the full-batch state (index_copy_) and the active rows gathered (index_select)
//   into a new, smaller working state, so the convolution runs on the active images only and
//   per-image early exit saves real work. The new size is rounded up to 4 sizes per octave (padding
//   with already frozen images, which the epilogue skips) so that cudnn.benchmark users see few
//   distinct shapes. At the end the working state is written back once more.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <pcdeq/activations.h>

#include "conv_solve.cuh"
#include "dense_kernels.cuh"  // epilogue_value (the activations.h math), relative_residual, verdict, square, warp_sum
#include "op_checks.cuh"

namespace pcdeq::cuda {
namespace {

// --- the epilogue kernel ---------------------------------------------------------------------------

constexpr int kEpilogueThreads = 256;
constexpr int kEpilogueWarps = kEpilogueThreads / 32;
constexpr int kEpilogueItems = 8;  // elements per thread, all loaded before the first is used
constexpr int64_t kChunk = int64_t{kEpilogueThreads} * kEpilogueItems;  // elements per block

// Host checks: adaptive by default (module comment); these bound it.
constexpr int kFirstCheck = 4;
constexpr int kMaxCheckGap = 8;

// State (and accumulation) type for an input type: float64 stays, the rest is solved in float32.
template <typename T>
using StateOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename S, typename T>
__device__ __forceinline__ S to_state(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<S>(v);
  }
}

template <typename T, typename S>
__device__ __forceinline__ T from_state(S v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

// The head of the status block, which the host copies at a check (with the per-image arrays behind it).
template <typename S>
struct StatusHead {
  int num_active;  // images still iterating; 0 once all stopped (sample) or the batch rule was met
  int batch_done;  // the batch rule was met
  S ratio;         // batch rule: the whole-batch relative residual of the last step
  S ratio_prev;    // ... and of the step before (for the host's prediction)
};
constexpr size_t kHeadBytes = 32;
static_assert(sizeof(StatusHead<double>) <= kHeadBytes && sizeof(StatusHead<float>) <= kHeadBytes, "head");

// Byte offsets in the status block: head, residual[B], residual_prev[B] (state type), active[B] (u8).
template <typename S>
struct StatusLayout {
  size_t residual, residual_prev, active, bytes;
  explicit StatusLayout(int64_t batch) {
    residual = kHeadBytes;
    residual_prev = residual + sizeof(S) * static_cast<size_t>(batch);
    active = residual_prev + sizeof(S) * static_cast<size_t>(batch);
    bytes = active + static_cast<size_t>(batch);
  }
};

template <typename T>
struct EpilogueParams {
  using S = StateOf<T>;
  int64_t n;                             // elements per image
  int chunks;                            // blocks per image
  int working;                           // images in the working set (the convolution's batch)
  int batch;                             // B
  const int64_t* __restrict__ slot_image;  // (working,) working slot -> image; null: the identity
  const T* __restrict__ y;               // (working, n) the convolution's output
  const T* __restrict__ side0;           // (B, n) u (forward) or v (adjoint)
  const T* __restrict__ side1;           // (B, n) D (adjoint), else null
  S* __restrict__ x;                     // (working, n) the state, updated in place
  T* __restrict__ xo;                    // (working, n) its copy in T, the convolution's operand (half types), else null
  // cross-block communication (no __restrict__: written by one block, read by another)
  double* partials;                      // (working, chunks, 2) per-chunk squared sums, when chunks > 1
  double* image_sums;                    // (working, 2) per-image squared sums (batch rule)
  unsigned* tickets;                     // (working,) arrivals per image this step (reset by the last)
  unsigned* batch_ticket;                // (1,) images finished this step (batch rule)
  StatusHead<S>* head;
  S* residual;                           // (B,)
  S* residual_prev;                      // (B,)
  uint8_t* active;                       // (B,)
  int* iterations;                       // (B,)
  bool* converged;                       // (B,)
  S tol;
  bool batch_stop;
};

// Sums a and b over the block in a fixed order (warp butterflies, then the warp totals in warp 0);
// the result is valid in warp 0. Starts and ends with every thread past a barrier.
__device__ __forceinline__ void block_sum2(double& a, double& b, double (&red)[2][kEpilogueWarps]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kEpilogueWarps ? red[0][lane] : 0.0;
    b = lane < kEpilogueWarps ? red[1][lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();  // red may be reused
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kEpilogueThreads) conv_epilogue_kernel(const EpilogueParams<T> p) {
  using S = StateOf<T>;
  constexpr bool kOperandCopy = !std::is_same_v<S, T>;
  __shared__ double red[2][kEpilogueWarps];
  __shared__ int last_s;

  // Both reads are stable for this block: the count reaches 0 only once every image is frozen or
  // (batch rule) after every block of the step has arrived, and image b's flag changes only in the
  // last of b's blocks, after all of them read it.
  if (p.head->num_active == 0) {
    return;  // the solve has finished; the host learns it at its next check
  }
  const int slot = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.chunks));
  const int chunk = static_cast<int>(blockIdx.x - static_cast<unsigned>(slot) * p.chunks);
  const int64_t image = p.slot_image != nullptr ? p.slot_image[slot] : slot;
  if (p.active[image] == 0) {
    return;  // frozen: state, count and residual stay as they are
  }

  const int64_t n = p.n;
  const size_t row = static_cast<size_t>(slot) * static_cast<size_t>(n);
  const size_t side_row = static_cast<size_t>(image) * static_cast<size_t>(n);
  const int64_t first = static_cast<int64_t>(chunk) * kChunk + threadIdx.x;

  S acc[kEpilogueItems];
  S s0[kEpilogueItems];
  S s1[kEpilogueItems];
  S old[kEpilogueItems];
#pragma unroll
  for (int i = 0; i < kEpilogueItems; ++i) {
    const int64_t e = first + static_cast<int64_t>(i) * kEpilogueThreads;
    const bool in = e < n;
    acc[i] = in ? to_state<S>(__ldg(p.y + row + e)) : S(0);
    s0[i] = in ? to_state<S>(__ldg(p.side0 + side_row + e)) : S(0);
    if constexpr (MODE == kAdjoint) {
      s1[i] = in ? to_state<S>(__ldg(p.side1 + side_row + e)) : S(0);
    } else {
      s1[i] = S(0);
    }
    old[i] = in ? p.x[row + e] : S(0);
  }
  double sd = 0.0;
  double sn = 0.0;
#pragma unroll
  for (int i = 0; i < kEpilogueItems; ++i) {
    const int64_t e = first + static_cast<int64_t>(i) * kEpilogueThreads;
    if (e < n) {
      const S next = epilogue_value<MODE, S>(acc[i], s0[i], s1[i]);
      const S diff = next - old[i];  // in S, as the reference
      sd += square(diff);
      sn += square(next);
      p.x[row + e] = next;
      if constexpr (kOperandCopy) {
        p.xo[row + e] = from_state<T>(next);
      }
    }
  }
  block_sum2(sd, sn, red);

  if (p.chunks > 1) {
    // level 2: the last block of this image to arrive sums the image's partials in chunk order
    if (threadIdx.x == 0) {
      double* part = p.partials + (static_cast<size_t>(slot) * p.chunks + chunk) * 2;
      part[0] = sd;
      part[1] = sn;
      __threadfence();  // the partial is visible before the ticket says so
      const unsigned ticket = atomicAdd(p.tickets + slot, 1u);
      last_s = ticket == static_cast<unsigned>(p.chunks - 1);
    }
    __syncthreads();
    if (!last_s) {
      return;
    }
    __threadfence();
    sd = 0.0;
    sn = 0.0;
    const double* part = p.partials + static_cast<size_t>(slot) * p.chunks * 2;
    for (int c = threadIdx.x; c < p.chunks; c += kEpilogueThreads) {
      sd += __ldcg(part + 2 * c);  // L2: written by other blocks during this kernel
      sn += __ldcg(part + 2 * c + 1);
    }
    block_sum2(sd, sn, red);
  }

  // this image's step is complete: thread 0 holds its sums
  if (threadIdx.x == 0) {
    if (p.chunks > 1) {
      p.tickets[slot] = 0u;  // for the next step
    }
    const S r = relative_residual<S>(sd, sn);
    p.residual_prev[image] = p.residual[image];
    p.residual[image] = r;
    p.iterations[image] += 1;
    if (!p.batch_stop) {
      const Verdict v = verdict(r, p.tol);
      if (v != Verdict::kGoOn) {  // converged, or not finite: stopped unconverged
        p.active[image] = 0;
        p.converged[image] = v == Verdict::kConverged;
        atomicSub(&p.head->num_active, 1);
      }
    } else {
      p.image_sums[2 * static_cast<size_t>(slot)] = sd;
      p.image_sums[2 * static_cast<size_t>(slot) + 1] = sn;
      __threadfence();
      const unsigned ticket = atomicAdd(p.batch_ticket, 1u);
      last_s = ticket == static_cast<unsigned>(p.working - 1);
    }
  }
  if (!p.batch_stop) {
    return;
  }
  // batch rule (no image ever freezes on its own, so the working set is the whole batch): the last
  // image to finish sums the per-image totals in image order
  __syncthreads();
  if (!last_s) {
    return;
  }
  __threadfence();
  double td = 0.0;
  double tn = 0.0;
  for (int64_t j = threadIdx.x; j < p.working; j += kEpilogueThreads) {
    td += __ldcg(p.image_sums + 2 * static_cast<size_t>(j));
    tn += __ldcg(p.image_sums + 2 * static_cast<size_t>(j) + 1);
  }
  block_sum2(td, tn, red);
  if (threadIdx.x == 0) {
    *p.batch_ticket = 0u;
    const S ratio = relative_residual<S>(td, tn);
    p.head->ratio_prev = p.head->ratio;
    p.head->ratio = ratio;
    const Verdict v = verdict(ratio, p.tol);
    if (v != Verdict::kGoOn) {  // met (all converged) or not finite (none converged): every image stops
      p.head->num_active = 0;
      p.head->batch_done = v == Verdict::kConverged;
    }
    last_s = v == Verdict::kConverged;
  }
  __syncthreads();
  if (last_s) {
    for (int64_t b = threadIdx.x; b < p.batch; b += kEpilogueThreads) {
      p.converged[b] = true;
    }
  }
}

// The status block before the first step: every image active with infinite residuals.
template <typename S>
__global__ void conv_status_init_kernel(StatusHead<S>* head, S* residual, S* residual_prev, uint8_t* active, int batch) {
  // 64-bit: b + stride must not wrap for a batch near INT_MAX
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < batch; b += stride) {
    residual[b] = S(INFINITY);
    residual_prev[b] = S(INFINITY);
    active[b] = 1;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    head->num_active = batch;
    head->batch_done = 0;
    head->ratio = S(INFINITY);
    head->ratio_prev = S(INFINITY);
  }
}

// --- host side -------------------------------------------------------------------------------------

// The images' shape and the element order inside an image.
struct ConvShape {
  int64_t batch, channels, height, width;
  bool nhwc;  // channels last (float32 and the half types); else NCHW (float64)
  int64_t n() const { return channels * height * width; }
  at::MemoryFormat format() const { return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
};

// (B, C, H, W), any strides -> (B, n) contiguous rows in the layout's element order (a view if it is
// already laid out that way).
at::Tensor to_rows(const at::Tensor& x, const ConvShape& s) {
  const int64_t batch = x.size(0);
  if (s.nhwc) {
    return x.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({batch, s.n()});
  }
  return x.contiguous().reshape({batch, s.n()});
}

// (rows, n) -> (rows, C, H, W) view with the layout's strides.
at::Tensor to_images(const at::Tensor& rows, const ConvShape& s) {
  const int64_t batch = rows.size(0);
  if (s.nhwc) {
    return rows.view({batch, s.height, s.width, s.channels}).permute({0, 3, 1, 2});
  }
  return rows.view({batch, s.channels, s.height, s.width});
}

struct CheckSchedule {
  int every;      // fixed cadence, or (adaptive) the largest gap between checks
  bool adaptive;  // predict the next check from the residuals
  int first() const { return adaptive ? std::min(kFirstCheck, every) : every; }
};

CheckSchedule schedule_from_env() {
  const char* value = std::getenv("PCDEQ_CUDA_CHECK_EVERY");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) {
    return {kMaxCheckGap, true};
  }
  char* end = nullptr;
  const long k = std::strtol(value, &end, 10);
  TORCH_CHECK(
      end != value && *end == '\0' && k >= 1 && k <= INT_MAX,
      "PCDEQ_CUDA_CHECK_EVERY=", value, ": give the number of steps between host checks (>= 1), or auto");
  return {static_cast<int>(k), false};
}

// Steps until r_k = r c^k < tol with c = r / r_prev; INT_MAX when the two give no rate.
int predicted_steps(double r, double r_prev, double tol) {
  if (!(r > 0.0) || !(r < r_prev) || !std::isfinite(r_prev) || !(tol > 0.0)) {
    return INT_MAX;
  }
  if (r < tol) {
    return 1;
  }
  const double k = std::log(tol / r) / std::log(r / r_prev);
  return k < 1e6 ? std::max(1, static_cast<int>(std::ceil(k))) : INT_MAX;
}

// Working-set sizes: exact up to 16, then 4 per octave (padding at most 1/4).
int64_t bucket_size(int64_t count) {
  if (count <= 16) {
    return count;
  }
  int log2 = 0;
  while ((int64_t{2} << log2) <= count) {
    ++log2;
  }
  const int64_t grain = int64_t{1} << (log2 - 2);
  return (count + grain - 1) / grain * grain;
}

struct ConvProblem {
  ConvShape shape;
  at::Tensor w;      // (C, C, 3, 3), input dtype, the layout's memory format: W, or the adjoint's flipped W^T
  at::Tensor side0;  // (B, n) input dtype: u or v
  at::Tensor side1;  // (B, n) input dtype: D (adjoint), else undefined
  at::Tensor x0;     // (B, n) state dtype: the initial state, a buffer the solve owns and overwrites
  double tol = 1e-4;
  int64_t max_iter = 0;
  bool batch_stop = false;
};

template <typename T, int MODE>
SolveOutputs run_conv(const ConvProblem& pr) {
  using S = StateOf<T>;
  constexpr bool kOperandCopy = !std::is_same_v<S, T>;
  const CheckSchedule schedule = schedule_from_env();  // first: a bad value fails before any GPU work
  const ConvShape& shape = pr.shape;
  const int64_t batch = shape.batch;
  const int64_t n = shape.n();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  TORCH_CHECK(
      batch <= INT_MAX && chunks <= INT_MAX / batch,
      "pcdeq cuda: convolutional problem too large (B = ", batch, ", C*H*W = ", n, ")");
  const auto options = pr.x0.options();
  const int device = pr.x0.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const S tol = static_cast<S>(pr.tol);  // the reference compares r < tol in the state dtype
  check_not_capturing(stream);
  const int max_iter = static_cast<int>(std::min<int64_t>(pr.max_iter, INT_MAX));

  at::Tensor home = pr.x0;  // (B, n): every image's state; the working set's rows live in xw until written back
  at::Tensor xw = home;     // (working, n) state of the working set
  at::Tensor xo = kOperandCopy ? xw.to(pr.w.scalar_type()) : xw;  // the convolution's operand
  at::Tensor slots;         // (working,) int64 image of each working slot; undefined: the identity
  std::vector<int64_t> slots_host;
  int64_t working = batch;

  at::Tensor iterations = at::zeros({batch}, options.dtype(at::kInt));
  at::Tensor converged = at::zeros({batch}, options.dtype(at::kBool));
  const StatusLayout<S> layout(batch);
  at::Tensor status = at::empty({static_cast<int64_t>(layout.bytes)}, options.dtype(at::kByte));
  uint8_t* status_ptr = status.data_ptr<uint8_t>();
  auto* head = reinterpret_cast<StatusHead<S>*>(status_ptr);
  S* residual = reinterpret_cast<S*>(status_ptr + layout.residual);
  S* residual_prev = reinterpret_cast<S*>(status_ptr + layout.residual_prev);
  uint8_t* active = status_ptr + layout.active;
  {
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((batch + threads - 1) / threads, 1024));
    conv_status_init_kernel<S><<<blocks, threads, 0, stream>>>(head, residual, residual_prev, active, static_cast<int>(batch));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto sum_options = options.dtype(at::kDouble);  // squared norms are summed in double
  at::Tensor partials = chunks > 1 ? at::empty({batch * chunks * 2}, sum_options) : at::Tensor();
  at::Tensor image_sums = pr.batch_stop ? at::empty({batch * 2}, sum_options) : at::Tensor();
  at::Tensor tickets = at::zeros({batch + 1}, options.dtype(at::kInt));  // per image, then the batch's

  EpilogueParams<T> p{};
  p.n = n;
  p.chunks = static_cast<int>(chunks);
  p.batch = static_cast<int>(batch);
  p.side0 = reinterpret_cast<const T*>(pr.side0.const_data_ptr());
  p.side1 = pr.side1.defined() ? reinterpret_cast<const T*>(pr.side1.const_data_ptr()) : nullptr;
  p.partials = partials.defined() ? partials.data_ptr<double>() : nullptr;
  p.image_sums = image_sums.defined() ? image_sums.data_ptr<double>() : nullptr;
  p.tickets = reinterpret_cast<unsigned*>(tickets.data_ptr<int>());
  p.batch_ticket = p.tickets + batch;
  p.head = head;
  p.residual = residual;
  p.residual_prev = residual_prev;
  p.active = active;
  p.iterations = iterations.data_ptr<int>();
  p.converged = converged.data_ptr<bool>();
  p.tol = tol;
  p.batch_stop = pr.batch_stop;

  const std::array<int64_t, 2> ones{1, 1};  // stride, padding and dilation
  at::Tensor pinned;  // host copy of the status block, allocated at the first check
  int64_t next_check = schedule.first();
  for (int64_t step = 0; step < max_iter;) {
    const at::Tensor y = to_rows(
        at::conv2d(to_images(xo, shape), pr.w, std::optional<at::Tensor>(), ones, ones, ones, 1), shape);
    TORCH_INTERNAL_ASSERT(y.scalar_type() == pr.w.scalar_type() && y.size(0) == working);
    p.working = static_cast<int>(working);
    p.slot_image = slots.defined() ? slots.const_data_ptr<int64_t>() : nullptr;
    p.y = reinterpret_cast<const T*>(y.const_data_ptr());
    p.x = xw.data_ptr<S>();
    p.xo = kOperandCopy ? reinterpret_cast<T*>(xo.data_ptr()) : nullptr;
    conv_epilogue_kernel<T, MODE><<<static_cast<unsigned>(working * chunks), kEpilogueThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ++step;
    if (step != next_check || step >= max_iter) {
      continue;
    }

    // --- a host check ---
    if (!pinned.defined()) {
      pinned = at::empty({static_cast<int64_t>(layout.bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    }
    const size_t bytes = pr.batch_stop ? kHeadBytes : layout.bytes;
    C10_CUDA_CHECK(cudaMemcpyAsync(pinned.data_ptr(), status_ptr, bytes, cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    const uint8_t* host = pinned.const_data_ptr<uint8_t>();
    StatusHead<S> h;
    std::memcpy(&h, host, sizeof(h));
    if (h.num_active == 0) {
      break;
    }
    int gap = schedule.every;
    if (pr.batch_stop) {
      if (schedule.adaptive) {
        gap = std::min(gap, predicted_steps(h.ratio, h.ratio_prev, pr.tol));
      }
    } else {
      const S* res_host = reinterpret_cast<const S*>(host + layout.residual);
      const S* prev_host = reinterpret_cast<const S*>(host + layout.residual_prev);
      const uint8_t* active_host = host + layout.active;
      std::vector<int64_t> keep;
      std::vector<int64_t> frozen;
      keep.reserve(static_cast<size_t>(h.num_active));
      int needed = 0;
      for (int64_t j = 0; j < working; ++j) {
        const int64_t b = slots_host.empty() ? j : slots_host[static_cast<size_t>(j)];
        if (active_host[b] != 0) {
          keep.push_back(b);
          needed = std::max(needed, predicted_steps(res_host[b], prev_host[b], pr.tol));
        } else {
          frozen.push_back(b);
        }
      }
      if (schedule.adaptive) {
        gap = std::min(gap, needed);
      }
      // compaction: the active images alone, when that shrinks the convolution's batch by >= 1/4
      const int64_t target = bucket_size(static_cast<int64_t>(keep.size()));
      if (target * 4 <= working * 3) {
        for (size_t i = 0; static_cast<int64_t>(keep.size()) < target; ++i) {
          keep.push_back(frozen[i]);  // padding: frozen images, which the epilogue skips
        }
        std::sort(keep.begin(), keep.end());
        if (slots.defined()) {
          home.index_copy_(0, slots, xw);  // the working set's states go home
        }                                  // (else xw is home itself)
        slots = at::from_blob(keep.data(), {target}, at::TensorOptions().dtype(at::kLong)).to(home.device());
        xw = home.index_select(0, slots);
        xo = kOperandCopy ? xw.to(pr.w.scalar_type()) : xw;  // = the old operand rows: rounding is idempotent
        slots_host = std::move(keep);
        working = target;
      }
    }
    next_check = step + std::max(1, gap);  // int64: no overflow for a huge PCDEQ_CUDA_CHECK_EVERY
  }
  if (slots.defined()) {
    home.index_copy_(0, slots, xw);
  }
  at::Tensor residual_out =
      status.narrow(0, static_cast<int64_t>(layout.residual), batch * static_cast<int64_t>(sizeof(S)))
          .view(pr.x0.scalar_type())
          .clone();
  return {home, iterations, residual_out, converged};
}

// One instantiation per map id (every activation of the table, and the adjoint).
template <typename T>
SolveOutputs run_conv_mode(const ConvProblem& pr, int mode) {
  return dispatch_map_id</*kWithAdjoint=*/true>(
      "pcdeq cuda", mode, [&](auto map) { return run_conv<T, decltype(map)::value>(pr); });
}

// Runs the solve and returns the state in the input's dtype and memory format (as
// torch.empty_like(input), which the op's fake kernel promises).
SolveOutputs run_conv_problem(const ConvProblem& pr, int mode, const at::Tensor& input) {
  SolveOutputs out;
  switch (input.scalar_type()) {
    case at::kFloat: out = run_conv_mode<float>(pr, mode); break;
    case at::kDouble: out = run_conv_mode<double>(pr, mode); break;
    case at::kHalf: out = run_conv_mode<__half>(pr, mode); break;
    case at::kBFloat16: out = run_conv_mode<__nv_bfloat16>(pr, mode); break;
    default: TORCH_CHECK(false, "pcdeq cuda: unsupported dtype ", input.scalar_type());
  }
  at::Tensor state = at::empty_like(input);
  state.copy_(to_images(std::get<0>(out), pr.shape));
  std::get<0>(out) = std::move(state);
  return out;
}

// The shape of a (checked) convolutional problem's input x (B, C, H, W), and its layout.
ConvShape conv_shape(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.scalar_type() != at::kDouble};
}

// Nothing to iterate (empty batch or images): the trivial outputs, the state in the input's dtype and
// memory format.
SolveOutputs trivial_conv(const at::Tensor& x0_images, const at::Tensor& input, double tol, int64_t max_iter) {
  SolveOutputs out = trivial_solve(x0_images, tol, max_iter, input.scalar_type());
  at::Tensor state = at::empty_like(input);
  state.copy_(x0_images);
  std::get<0>(out) = std::move(state);
  return out;
}

}  // namespace

SolveOutputs conv_forward_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const ConvShape shape = conv_shape(u);
  const c10::NoGradGuard no_grad;  // the solve's own tensor ops (conv2d on W) never record a graph
  const auto options = u.options().dtype(state_dtype(u.scalar_type()));
  ConvProblem pr;
  pr.shape = shape;
  // the initial state: a fresh buffer (the solve overwrites it), never z0's own storage
  pr.x0 = z0.has_value() ? at::empty({shape.batch, shape.n()}, options) : at::zeros({shape.batch, shape.n()}, options);
  if (z0.has_value()) {
    to_images(pr.x0, shape).copy_(*z0);
  }
  if (shape.batch == 0 || shape.n() == 0) {
    return trivial_conv(to_images(pr.x0, shape), u, tol, max_iter);
  }
  pr.w = weight.contiguous(shape.format());
  pr.side0 = to_rows(u, shape);
  pr.tol = tol;
  pr.max_iter = max_iter;
  pr.batch_stop = batch_stop;
  return run_conv_problem(pr, static_cast<int>(activation), u);
}

SolveOutputs conv_adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const ConvShape shape = conv_shape(v);
  const c10::NoGradGuard no_grad;  // the solve's own tensor ops (conv2d on W) never record a graph
  const auto sdt = state_dtype(v.scalar_type());
  ConvProblem pr;
  pr.shape = shape;
  pr.side0 = to_rows(v, shape);
  pr.side1 = to_rows(D, shape);
  // h_0 = D * v in the state dtype, as the reference
  pr.x0 = at::mul(pr.side1.to(sdt), pr.side0.to(sdt));  // a fresh buffer: the solve overwrites it
  if (shape.batch == 0 || shape.n() == 0) {
    return trivial_conv(to_images(pr.x0, shape), v, tol, max_iter);
  }
  // conv_transpose2d(h, W, padding=1) = conv2d(h, W', padding=1) with W'[i, o, a, b] = W[o, i, 2 - a, 2 - b]
  pr.w = weight.flip({2, 3}).transpose(0, 1).contiguous(shape.format());
  pr.tol = tol;
  pr.max_iter = max_iter;
  pr.batch_stop = batch_stop;
  return run_conv_problem(pr, kAdjoint, v);
}

}  // namespace pcdeq::cuda
