// A register-blocked matmul for the CPU solver's small-d path: C = A @ M for a few rows of A at a
// time, with M (d x d) packed once per solve.
//
// Why not BLAS: at the paper's size (64 x 80 times 80 x 80) one MKL sgemm call re-packs M and pays
// its dispatch on every iteration, about as much as the arithmetic itself (and on AMD CPUs MKL
// takes its AVX2 path even where AVX-512 is available). Here M is packed once
// (rows padded to a whole number of SIMD vectors, zeros beyond d) and each tile of R rows x NV
// vectors keeps its R * NV accumulators in registers for the whole k loop: per k it loads NV vectors
// of M's row k, broadcasts R entries of A and issues R * NV fused multiply-adds. Built on ATen's
// at::vec::Vectorized, so it runs at the SIMD level the extension is compiled for.
//
// Summation order: each output is sum_k a_k * m_k accumulated in T in increasing k, one rounding per
// fma. BLAS orders it otherwise; the difference is rounding (a few ulp), well inside the tests'
// tolerances.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "vec_activations.h"

namespace pcdeq::cpu {

// Largest tile: kTileRows rows x kMaxTileVectors vectors of accumulators. 4 x 6 = 24 accumulators
// plus 6 vectors of M and a broadcast fill 31 of AVX-512's 32 registers; AVX2 has 16: 4 x 3 there.
constexpr int kTileRows = 4;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxTileVectors = 6;
#else
constexpr int kMaxTileVectors = 3;
#endif

// M (d x d) as d rows of `ld` entries, ld = d rounded up to a multiple of the vector width, zero
// padded; built once per solve. `transpose` packs M = W^T (forward) from W; else M = W (adjoint).
template <typename T>
struct PackedMatrix {
  at::Tensor storage;  // (d, ld): torch's allocator aligns it to 64 bytes
  const T* data = nullptr;
  int64_t d = 0;
  int64_t ld = 0;

  // weight: (d, d) contiguous, in T.
  PackedMatrix(const at::Tensor& weight, bool transpose) : d(weight.size(0)) {
    constexpr int64_t width = Vec<T>::size();
    ld = (d + width - 1) / width * width;
    storage = at::empty({d, ld}, weight.options());
    T* out = storage.data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    if (transpose) {  // row k of M is column k of W (ATen's transpose: 16 x 16 register blocks on AVX-512)
      at::vec::transpose_mxn<T>(w, d, out, ld, static_cast<int>(d), static_cast<int>(d));
    }
    for (int64_t k = 0; k < d; ++k) {
      T* row = out + k * ld;
      if (!transpose) {
        std::copy(w + k * d, w + (k + 1) * d, row);
      }
      std::fill(row + d, row + ld, T(0));
    }
    data = out;
  }
};

// c[r, 0:NV*width) = sum_k a[r][k] * m[k, 0:NV*width) for r < R, k < k_len: a holds R row pointers,
// m has row stride ldm, c row stride ldc; m and c point at the tile's first column.
template <typename T, int R, int NV>
void gemm_tile(const T* const* a, const T* m, int64_t ldm, int64_t k_len, T* c, int64_t ldc) {
  using V = Vec<T>;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V(T(0));
    }
  }
  for (int64_t k = 0; k < k_len; ++k) {
    const T* m_row = m + k * ldm;
    V mv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      mv[v] = V::loadu(m_row + v * V::size());
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V ar(a[r][k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = at::vec::fmadd(ar, mv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v].store(c + r * ldc + v * V::size());
    }
  }
}

template <typename T>
using GemmTileFn = void (*)(const T* const*, const T*, int64_t, int64_t, T*, int64_t);

template <typename T, int R, size_t... NV>
constexpr std::array<GemmTileFn<T>, sizeof...(NV)> tile_row_table(std::index_sequence<NV...>) {
  return {&gemm_tile<T, R, static_cast<int>(NV) + 1>...};
}

// The instantiations, indexed [rows - 1][vectors - 1].
template <typename T, size_t... R>
constexpr std::array<std::array<GemmTileFn<T>, kMaxTileVectors>, sizeof...(R)> tile_table(std::index_sequence<R...>) {
  return {tile_row_table<T, static_cast<int>(R) + 1>(std::make_index_sequence<kMaxTileVectors>{})...};
}

// c[r, 0:ld) = a[r][0:d) @ M for r < rows <= kTileRows: a holds the rows' pointers, c has row stride
// m.ld (its columns beyond d come out 0). The columns are cut into near-equal chunks of at most
// kMaxTileVectors vectors.
template <typename T>
void gemm_rows(const T* const* a, int64_t rows, const PackedMatrix<T>& m, T* c) {
  static constexpr auto table = tile_table<T>(std::make_index_sequence<kTileRows>{});
  constexpr int64_t width = Vec<T>::size();
  const int64_t vectors = m.ld / width;
  const int64_t chunks = (vectors + kMaxTileVectors - 1) / kMaxTileVectors;
  int64_t first = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t count = (vectors - first) / (chunks - chunk);  // spread the remainder evenly
    table[rows - 1][count - 1](a, m.data + first * width, m.ld, m.d, c + first * width, m.ld);
    first += count;
  }
}

}  // namespace pcdeq::cpu
