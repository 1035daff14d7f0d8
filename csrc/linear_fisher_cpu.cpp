// CPU kernel of the Linear Fisher's register-tiled form (fishkern/ops/linear_fisher.py, form "fused"):
//
//   acc[o, i] += Σ_b ( Σ_{t < len[b]} g[b, t, o] · x[b, t, i] )²     x: [B, T, IN], g: [B, T, OUT]
//
// The per-sample forms of the default kernel form each sample's OUT x IN gradient in memory and
// square it into acc with a separate pass: for the few tokens of a classification sample that pass
// (reading and writing acc once per sample) costs more than the product itself. Here a tile of
// 6 rows x 16 (float32) or 8 (float64) columns of one sample's gradient is summed over its tokens in
// registers, squared there and added to acc's tile, which stays in L1 while all the samples of a
// chunk pass over it: acc is read and written once per chunk of samples, not once per sample, and no
// per-sample gradient is ever stored. Samples are chunked so that the chunk's inputs (its tokens x
// IN) stay in L2 while every row block reads them.
//
// Threads split the rows of acc (each owns whole rows: no two threads write one entry), and every
// entry is summed in a fixed order (samples in order, tokens in order), so results are
// deterministic and independent of the thread count. Products are fused multiply-adds where the CPU
// has them (compiled for AVX-512, AVX+FMA and the baseline, picked at load time by CPU features;
// "arch=" clones are picked by CPU model and would run the baseline on AMD).
//
// Internal op (declared here, called by the op's CPU kernel in Python after its argument checks):
//   linear_fisher_fused_cpu_(acc, x, g, lengths): acc float32 / float64 contiguous [OUT, IN]; x, g of
//   acc's dtype with unit stride in the last dimension; lengths int64 [B] (clamped to [0, T]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fishkern {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FISHKERN_FISHER_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define FISHKERN_FISHER_CLONES
#endif

constexpr int kRows = 6;  // rows of acc per tile (12 vector accumulators + 2 input vectors + 1 broadcast)

// Two 32-byte vectors per tile row: 16 floats or 8 doubles. GCC vector extensions, so that the same
// source compiles to AVX2 / AVX-512 / SSE2 per clone; unaligned loads through memcpy.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

// A chunk of consecutive samples, packed so that a tile reads its operands sequentially (strided
// reads of the unpacked rows, OUT x 4 bytes apart, crossed a page per token and ran ~50x slower):
//   xp[i_tile][token][W]    the chunk's inputs, columns zero-padded to a multiple of W
//   gp[o_block][token][6]   its output gradients, rows zero-padded to a multiple of 6
// with the chunk's tokens (t < len[b] of each sample, in order) concatenated; off[b] is where sample b
// starts. The zero padding makes every tile full: padded columns and rows sum to zero and are never
// stored.
template <typename T>
struct Packed {
  std::vector<T> x, g;
  std::vector<int64_t> off;
  int64_t tokens = 0;
};

template <typename T>
constexpr int64_t tile_width() { return 2 * Vec<T>::lanes; }

// One tile: rows [o0, o0 + kRows) x columns [i0, i0 + W) of acc, over the chunk's samples; `rows` and
// `cols` are how many of them exist in acc (fewer at the edges).
template <typename T>
FISHKERN_FISHER_CLONES void tile(T* __restrict acc, int64_t ld, const T* __restrict xp, const T* __restrict gp,
                                 const int64_t* __restrict off, int64_t samples, int64_t rows, int64_t cols) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = 2 * L;
  const bool full = rows == kRows && cols == W;
  T edge[kRows * W];
  T* dst = acc;
  int64_t dld = ld;
  if (!full) {  // edge tile: through a zero-padded copy
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t j = 0; j < W; ++j) edge[r * W + j] = (r < rows && j < cols) ? acc[r * ld + j] : T(0);
    dst = edge;
    dld = W;
  }
  V a[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    std::memcpy(&a[r][0], dst + r * dld, sizeof(V));
    std::memcpy(&a[r][1], dst + r * dld + L, sizeof(V));
  }
  for (int64_t b = 0; b < samples; ++b) {
    V c[kRows][2];
    for (int r = 0; r < kRows; ++r) c[r][0] = c[r][1] = V{};
    for (int64_t t = off[b], e = off[b + 1]; t < e; ++t) {
      V x0, x1;
      std::memcpy(&x0, xp + t * W, sizeof(V));
      std::memcpy(&x1, xp + t * W + L, sizeof(V));
      const T* gt = gp + t * kRows;
      for (int r = 0; r < kRows; ++r) {
        const T gv = gt[r];
        c[r][0] += gv * x0;
        c[r][1] += gv * x1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      a[r][0] += c[r][0] * c[r][0];
      a[r][1] += c[r][1] * c[r][1];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    std::memcpy(dst + r * dld, &a[r][0], sizeof(V));
    std::memcpy(dst + r * dld + L, &a[r][1], sizeof(V));
  }
  if (!full)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) acc[r * ld + j] = edge[r * W + j];
}

// Chunks of consecutive samples whose packed inputs (tokens x padded IN) fit a cache budget, so that
// they stay in L2 while every row block reads them (at least one sample per chunk).
std::vector<int64_t> sample_chunks(const std::vector<int64_t>& len, int64_t row_bytes) {
  constexpr int64_t kBudget = 192 * 1024;  // well inside a 512 KiB - 2 MiB L2
  std::vector<int64_t> cuts{0};
  int64_t bytes = 0;
  for (size_t b = 0; b < len.size(); ++b) {
    const int64_t need = len[b] * row_bytes;
    if (bytes > 0 && bytes + need > kBudget) {
      cuts.push_back(static_cast<int64_t>(b));
      bytes = 0;
    }
    bytes += need;
  }
  cuts.push_back(static_cast<int64_t>(len.size()));
  return cuts;
}

template <typename T>
void pack_chunk(Packed<T>& pk, const T* x, const T* g, int64_t xs0, int64_t xs1, int64_t gs0, int64_t gs1, int64_t IN,
                int64_t OUT, const std::vector<int64_t>& len, int64_t s0, int64_t s1) {
  constexpr int64_t W = tile_width<T>();
  const int64_t itiles = (IN + W - 1) / W, oblocks = (OUT + kRows - 1) / kRows;
  pk.off.assign(static_cast<size_t>(s1 - s0 + 1), 0);
  for (int64_t b = s0; b < s1; ++b) pk.off[b - s0 + 1] = pk.off[b - s0] + len[b];
  const int64_t n = pk.off.back();
  pk.tokens = n;
  if (pk.x.size() < static_cast<size_t>(itiles * n * W)) pk.x.resize(static_cast<size_t>(itiles * n * W));
  if (pk.g.size() < static_cast<size_t>(oblocks * n * kRows)) pk.g.resize(static_cast<size_t>(oblocks * n * kRows));
  T* px = pk.x.data();
  T* pg = pk.g.data();
  at::parallel_for(s0, s1, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < len[b]; ++t) {
        const int64_t tok = pk.off[b - s0] + t;
        const T* xr = x + b * xs0 + t * xs1;
        const T* gr = g + b * gs0 + t * gs1;
        for (int64_t it = 0; it < itiles; ++it) {
          T* o = px + (it * n + tok) * W;
          const int64_t i0 = it * W, w = std::min<int64_t>(W, IN - i0);
          for (int64_t j = 0; j < w; ++j) o[j] = xr[i0 + j];
          for (int64_t j = w; j < W; ++j) o[j] = T(0);
        }
        for (int64_t ob = 0; ob < oblocks; ++ob) {
          T* o = pg + (ob * n + tok) * kRows;
          const int64_t o0 = ob * kRows, h = std::min<int64_t>(kRows, OUT - o0);
          for (int64_t r = 0; r < h; ++r) o[r] = gr[o0 + r];
          for (int64_t r = h; r < kRows; ++r) o[r] = T(0);
        }
      }
  });
}

template <typename T>
void run(at::Tensor& acc, const at::Tensor& x, const at::Tensor& g, const std::vector<int64_t>& len) {
  constexpr int64_t W = tile_width<T>();
  const int64_t IN = x.size(2), OUT = g.size(2);
  const int64_t itiles = (IN + W - 1) / W, oblocks = (OUT + kRows - 1) / kRows;
  T* a = acc.mutable_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const std::vector<int64_t> cuts = sample_chunks(len, itiles * W * static_cast<int64_t>(sizeof(T)));
  Packed<T> pk;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    const int64_t s0 = cuts[c], s1 = cuts[c + 1];
    pack_chunk<T>(pk, xp, gp, x.stride(0), x.stride(1), g.stride(0), g.stride(1), IN, OUT, len, s0, s1);
    if (pk.tokens == 0) continue;
    const int64_t n = pk.tokens;
    at::parallel_for(0, oblocks, 1, [&](int64_t ob0, int64_t ob1) {
      for (int64_t ob = ob0; ob < ob1; ++ob) {
        const int64_t o0 = ob * kRows, rows = std::min<int64_t>(kRows, OUT - o0);
        for (int64_t it = 0; it < itiles; ++it) {
          const int64_t i0 = it * W;
          tile<T>(a + o0 * IN + i0, IN, pk.x.data() + it * n * W, pk.g.data() + ob * n * kRows, pk.off.data(),
                  s1 - s0, rows, std::min<int64_t>(W, IN - i0));
        }
      }
    });
  }
}

void linear_fisher_fused_cpu_(at::Tensor acc, const at::Tensor& x, const at::Tensor& g, const at::Tensor& lengths) {
  const char* op = "fishkern::linear_fisher_fused_cpu_";
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu() && g.device().is_cpu() && lengths.device().is_cpu(), op,
              ": all tensors must be on the CPU");
  TORCH_CHECK(acc.dim() == 2 && x.dim() == 3 && g.dim() == 3, op, ": acc [OUT, IN], x [B, T, IN], g [B, T, OUT]");
  TORCH_CHECK(x.size(0) == g.size(0) && x.size(1) == g.size(1) && acc.size(0) == g.size(2) && acc.size(1) == x.size(2),
              op, ": shapes do not agree: acc ", acc.sizes(), ", x ", x.sizes(), ", g ", g.sizes());
  const auto st = acc.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": acc must be float32 or float64, got ", st);
  TORCH_CHECK(x.scalar_type() == st && g.scalar_type() == st, op, ": x and g must have acc's dtype");
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, op, ": x must have unit stride in its last dimension");
  TORCH_CHECK(g.size(2) <= 1 || g.stride(2) == 1, op, ": g must have unit stride in its last dimension");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == x.size(0), op,
              ": lengths must be an int64 tensor of shape [B]");
  const int64_t B = x.size(0), T = x.size(1);
  if (acc.numel() == 0 || B == 0 || T == 0) return;
  const at::Tensor lc = lengths.contiguous();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  std::vector<int64_t> len(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) len[b] = std::min<int64_t>(std::max<int64_t>(lp[b], 0), T);  // never out of bounds
  if (st == at::kDouble)
    run<double>(acc, x, g, len);
  else
    run<float>(acc, x, g, len);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fishkern, m) {
  m.def("linear_fisher_fused_cpu_(Tensor(a!) acc, Tensor x, Tensor g, Tensor lengths) -> ()");
}
TORCH_LIBRARY_IMPL(fishkern, CPU, m) { m.impl("linear_fisher_fused_cpu_", &linear_fisher_fused_cpu_); }

}  // namespace fishkern
