// CPU kernel of fishkern::sampled_matmul: chosen entries of the product aᵀ·b,
//
//   out[e] = Σ_t a[t, index[e] / C] · b[t, index[e] % C]     a: [T, R], b: [T, C], index: flat row-major
//
// the weight gradient of a Linear layer (a = output gradient, b = input) or of HF's Conv1D
// (a = input, b = output gradient) at the k entries of a FISH mask only: 2·T·k flops instead of
// 2·T·R·C. Both operands are packed once, transposed and converted to the accumulation type, into
// token tiles ([tile][row][TB] with the tile's tokens contiguous, at most 1024 tokens a tile), so
// that each entry is a contiguous dot product; only the rows of a and columns of b that some entry
// reads are packed. torch's own transposing copy of [T, C] was 2-5x slower than this blocked
// packing on the Xeon it was measured on.
// The dot product is compiled for AVX-512, AVX2 and the baseline (GCC target clones) and picked at
// load time, so the shipped library needs no -march flag.
//
// Accumulation is in float32 for float32 / bfloat16 / float16 operands, float64 for float64; the
// result has the accumulation type. Every index is checked before anything is computed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FISHKERN_AVX2_TRANSPOSE 1
#endif

namespace fishkern {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FISHKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FISHKERN_CLONES
#endif

// Σ x[t]·y[t] over n contiguous values, with 16 independent partial sums so that the compiler
// vectorises it without reassociating a single running sum (no -ffast-math).
template <typename acc_t>
FISHKERN_CLONES acc_t dot(const acc_t* __restrict x, const acc_t* __restrict y, int64_t n) {
  acc_t s[16] = {0};
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    for (int l = 0; l < 16; ++l) s[l] += x[t + l] * y[t + l];
  for (; t < n; ++t) s[t & 15] += x[t] * y[t];
  acc_t total = 0;
  for (int l = 0; l < 16; ++l) total += s[l];
  return total;
}

#ifdef FISHKERN_AVX2_TRANSPOSE
// dst[c * ds + t] = src[t * rs + c] for an 8 x 8 block of float32 (rows: tokens): the textbook
// unpack / shuffle / permute transpose, about 4x the scalar copy's speed. Compiled for AVX2 whatever
// the build's flags; only called when the CPU has AVX2 (checked once).
__attribute__((target("avx2"))) void transpose8x8(const float* src, int64_t rs, float* dst, int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + rs), r2 = _mm256_loadu_ps(src + 2 * rs),
         r3 = _mm256_loadu_ps(src + 3 * rs), r4 = _mm256_loadu_ps(src + 4 * rs), r5 = _mm256_loadu_ps(src + 5 * rs),
         r6 = _mm256_loadu_ps(src + 6 * rs), r7 = _mm256_loadu_ps(src + 7 * rs);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
         u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
         u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
         u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// Pack src [T, n] (any strides) into dst [tiles][n][tb]: dst[tile, j, t] = src[tile*tb + t, j],
// zero-padded past T, for the columns j with used[j] only (the others are never read). Work items
// are (tile, block of 64 columns); within one, 16 tokens at a time are read down the column block
// (16 rows of 64 values stay in L1) and written as contiguous runs of 16.
template <typename src_t, typename acc_t>
void pack_tiles(const at::Tensor& src, acc_t* dst, int64_t T, int64_t n, int64_t tb, const std::vector<uint8_t>& used) {
  const src_t* s = src.const_data_ptr<src_t>();
  const int64_t rs = src.stride(0), cs = src.stride(1);
  const int64_t tiles = (T + tb - 1) / tb;
  constexpr int64_t kTok = 16, kCol = 64;
  const int64_t col_blocks = (n + kCol - 1) / kCol;
  at::parallel_for(0, tiles * col_blocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t tile = w / col_blocks, j0 = (w - tile * col_blocks) * kCol, j1 = std::min(n, j0 + kCol);
      acc_t* out = dst + tile * n * tb;
      for (int64_t t0 = 0; t0 < tb; t0 += kTok) {
        const int64_t tok0 = tile * tb + t0;
        const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kTok, T - tok0));
        int64_t j = j0;
#ifdef FISHKERN_AVX2_TRANSPOSE
        if constexpr (std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>) {
          if (cs == 1 && valid == kTok && has_avx2()) {
            // 8 x 8 blocks (all 16 tokens valid, columns contiguous); a block none of whose 8 columns
            // is used is skipped, the others are packed whole (unused columns are never read)
            for (; j + 8 <= j1; j += 8) {
              bool any = false;
              for (int64_t q = j; q < j + 8; ++q) any = any || used[q];
              if (!any) continue;
              const float* blk = s + tok0 * rs + j;
              transpose8x8(blk, rs, out + j * tb + t0, tb);
              transpose8x8(blk + 8 * rs, rs, out + j * tb + t0 + 8, tb);
            }
          }
        }
#endif
        for (; j < j1; ++j) {
          if (!used[j]) continue;
          acc_t* o = out + j * tb + t0;
          const src_t* col = s + tok0 * rs + j * cs;
          for (int64_t t = 0; t < valid; ++t) o[t] = static_cast<acc_t>(col[t * rs]);
          for (int64_t t = valid; t < kTok; ++t) o[t] = acc_t(0);
        }
      }
    }
  });
}

// Tokens per tile: at most 1024 (4 KiB of float32 per row and entry). Measured on a Xeon with a
// 105 MiB L3 (BERT-base shapes, T = 1024): smaller tiles sized for L2 were slower than one tile,
// the per-tile pass over the entries costs more than the L3 reads it saves.
int64_t tile_tokens(int64_t T) {
  const int64_t padded = (T + 15) / 16 * 16;
  return std::max<int64_t>(16, std::min<int64_t>(padded, 1024));
}

template <typename acc_t, typename src_t, typename idx_t>
void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& index, at::Tensor& out) {
  const int64_t T = a.size(0), R = a.size(1), C = b.size(1), k = index.numel();
  const int64_t tb = tile_tokens(T);
  const int64_t tiles = (T + tb - 1) / tb;
  const idx_t* idx = index.const_data_ptr<idx_t>();
  // the rows of a and columns of b that some entry reads (at low density most are not)
  std::vector<uint8_t> used_r(static_cast<size_t>(R), 0), used_c(static_cast<size_t>(C), 0);
  for (int64_t e = 0; e < k; ++e) {
    const int64_t f = static_cast<int64_t>(idx[e]), r = f / C;
    used_r[r] = 1;
    used_c[f - r * C] = 1;
  }
  // Scratch kept per calling thread and only grown: a fresh multi-MB allocation per call costs more
  // in page faults than the whole product at low density.
  thread_local std::vector<acc_t> scratch;
  const size_t na = static_cast<size_t>(tiles * R * tb), nb = static_cast<size_t>(tiles * C * tb);
  if (scratch.size() < na + nb) scratch.resize(na + nb);
  acc_t* pa = scratch.data();
  acc_t* pb = scratch.data() + na;
  pack_tiles<src_t, acc_t>(a, pa, T, R, tb, used_r);
  pack_tiles<src_t, acc_t>(b, pb, T, C, tb, used_c);
  acc_t* o = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, k, 256, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) o[e] = acc_t(0);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const acc_t* ta = pa + tile * R * tb;
      const acc_t* tbp = pb + tile * C * tb;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t f = static_cast<int64_t>(idx[e]);
        const int64_t r = f / C, c = f - r * C;
        o[e] += dot<acc_t>(ta + r * tb, tbp + c * tb, tb);
      }
    }
  });
}

at::Tensor sampled_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& index) {
  const char* op = "fishkern::sampled_matmul";
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && index.device().is_cpu(), op,
              ": a, b and index must be CPU tensors, got ", a.device(), ", ", b.device(), ", ", index.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D ([tokens, rows] and [tokens, cols]), got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0), op, ": a has ", a.size(0), " tokens (rows) but b has ", b.size(0));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a is ", a.scalar_type(), " but b is ", b.scalar_type());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": dtype ", st,
              "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op, ": index has dtype ",
              index.scalar_type(), "; expected int32 or int64");
  TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D, got shape ", index.sizes());
  const int64_t numel = a.size(1) * b.size(1);
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sampled_matmul_check", [&] {
    const index_t* p = idx.const_data_ptr<index_t>();
    for (int64_t e = 0; e < idx.numel(); ++e)
      TORCH_CHECK(p[e] >= 0 && p[e] < numel, op, ": index[", e, "] = ", static_cast<int64_t>(p[e]),
                  " is outside the ", a.size(1), " x ", b.size(1), " product (", numel, " entries)");
  });
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({idx.numel()}, a.options().dtype(acc));
  if (idx.numel() == 0) return out;
  if (a.size(0) == 0) return out.zero_();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sampled_matmul_index", [&] {
    using idx_t = index_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "sampled_matmul", [&] {
      if (acc == at::kDouble)
        run<double, scalar_t, idx_t>(a, b, idx, out);
      else
        run<float, scalar_t, idx_t>(a, b, idx, out);
    });
  });
  return out;
}

}  // namespace

// Declared in Python (fishkern/ops/sampled_matmul.py, with its fake and default kernels).
TORCH_LIBRARY_IMPL(fishkern, CPU, m) { m.impl("sampled_matmul", &sampled_matmul_cpu); }

}  // namespace fishkern
