// CUDA global top-k for fishkern::topk_select: radix select (AIR top-k, Zhang et al., "Parallel
// Top-K Algorithms on GPU: A Comprehensive Study and New Methods", SC'23) over many fp32 tensors
// read in place through a table of pointers, then a stable compaction that yields sorted indices
// with the exact tie rule. See topk_cuda.h for the API, the semantics and the number of reads.
//
// Free of torch headers on purpose (CUDA runtime + CUB only): scripts/check_cuda_compile.sh
// compiles it with plain nvcc.
//
// Kernels, in launch order (one stream, no host synchronisation; every decision that depends on
// the data is taken on the device from the State in the workspace, so later kernels may exit at
// once):
//   phase 1  init_kernel         tile table (tiles never straddle tensors), State, NaN sentinel
//            hist_kernel<0>      READS ALL SCORES: histogram of key bits 31..21, NaN check
//            choose_kernel<0>    bucket of the k-th largest -> prefix, remaining k
//            hist_kernel<1>      key bits 20..10 of the candidates; READS ALL SCORES, and if the
//                                candidates fit the buffer also writes them there (filtering)
//                                and stores per-tile counts of the entries above the prefix
//            choose_kernel<1>
//            hist_kernel<2>      key bits 9..0: reads the buffer if filled, else ALL SCORES (and
//                                filters them if they now fit)
//            choose_kernel<2>
//            buffer_count_kernel per-tile counts (above / equal to the threshold) from the buffer
//            full_count_kernel   only if nothing was buffered: READS ALL SCORES for those counts
//            2 x cub::DeviceScan::ExclusiveSum over the per-tile counts
//            starts_kernel       per-tensor output starts, NaN result
//   phase 2  write_kernel        READS THE SCORES of tiles with a partial selection; writes indices
//
// Index arithmetic is 64-bit throughout (totals above 2^31 entries); only in-tile counts (< 2^16)
// and tile ids (< 2^32, checked) are 32-bit.
#include "topk_cuda.h"

#include <cuda_runtime.h>

#include <cub/cub.cuh>

#include <climits>
#include <cstdint>

namespace fishkern_topk {
namespace {

// ---------------------------------------------------------------------------------------------
// Configuration

constexpr int kThreads = 256;             // threads per block in the tile kernels
constexpr int kWarps = kThreads / 32;
constexpr int kVecs = 8;                  // float4 loads per thread per tile
constexpr int kSeg = kVecs * 32 * 4;      // entries per warp segment: 1024
constexpr int kTile = kWarps * kSeg;      // entries per tile: 8192 (per-tile counts fit 16 bits)
constexpr int kChooseThreads = 512;  // threads of the single-block kernels (1024 caps registers at 64: spills on sm_90)
constexpr int kBlocksPerSm = 4;           // persistent grid: blocks per SM
constexpr int64_t kMaxTilesPerBlock = int64_t(1) << 18;  // keeps a block's uint32 counters < 2^31
constexpr int64_t kBufMin = int64_t(1) << 16;            // buffer capacity: max(2^16, total/32)
constexpr int64_t kBufDiv = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kAlign = 256;

static_assert(kTile < (1 << 16), "in-tile counts are packed in 16-bit fields");

// Digit d of the radix select covers key bits [kLo, kLo + kBits); the bits above are the prefix.
template <int PASS>
struct Digit;
template <>
struct Digit<0> {
  static constexpr int kLo = 21, kBits = 11;
};
template <>
struct Digit<1> {
  static constexpr int kLo = 10, kBits = 11;
};
template <>
struct Digit<2> {
  static constexpr int kLo = 0, kBits = 10;
};

// The search state, in the workspace. Written by init_kernel and by the single thread of
// choose_kernel that finds the bucket; read by the later kernels (stream order makes it visible).
// Invariant after each choose_kernel: the entries whose key bits above `shift` are greater than
// `prefix` are all selected (there are k - k_rem of them), `cand` entries have exactly `prefix`
// there, and k_rem of those (1 <= k_rem <= cand) are selected.
struct State {
  unsigned long long buf_count;  // entries written to the buffer (atomic, by the filtering pass)
  long long k_rem;               // selected entries still to find among the candidates
  long long cand;                // number of candidates: entries with (key >> shift) == prefix
  unsigned int prefix;           // key bits >= shift found so far
  int shift;                     // 32 before the first pass, then 21, 10, 0
  int done;                      // 1: the rule is final (last digit, early stop, or k = 0)
  int in_buffer;                 // 1: the buffer holds every candidate of the filtering pass
};

// Everything the kernels need, passed by value.
struct Args {
  const float* const* ptrs;   // [n] score tensors
  const int64_t* offsets;     // [n + 1] global offsets
  int n;
  int64_t total;
  int64_t k;
  State* st;
  unsigned long long* hist[3];  // per pass histograms (2048, 2048, 1024 bins)
  int64_t* tile_off;            // [n + 1] first tile of each tensor; tile_off[n] = number of tiles
  unsigned long long* tile_gt;  // [tiles] entries of the tile above the final rule's prefix
  unsigned long long* tile_eq;  // [tiles] entries of the tile equal to it
  unsigned long long* gt_excl;  // [tiles] exclusive scans of the two
  unsigned long long* eq_excl;
  uint32_t* buf_key;            // [cap] candidate keys
  uint32_t* buf_tile;           // [cap] their tiles
  int64_t cap;
  int64_t* starts;              // [n + 1] per-tensor output starts (phase 1 out, phase 2 in)
  int64_t* nan_tensor;          // [1]
  int64_t* const* out_ptrs;     // phase 2 destinations (one of the two)
  int64_t* out_concat;
};

// ---------------------------------------------------------------------------------------------
// Device helpers

// Order-preserving key: a > b as floats <=> key(a) > key(b) as unsigned; -0.0 and +0.0 share a key.
__device__ __forceinline__ uint32_t float_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// key >> S for a compile-time S in [0, 32] (32: no bits, every key matches the empty prefix 0).
template <int S>
__device__ __forceinline__ uint32_t high_bits(uint32_t key) {
  if constexpr (S >= 32) {
    return 0u;
  } else {
    return key >> S;
  }
}

// One tile: a range of at most kTile entries of one tensor.
struct Tile {
  const float* ptr;  // the tensor's data
  int64_t numel;     // the tensor's numel
  int64_t start;     // local index of the tile's first entry (a multiple of kTile)
  int len;           // entries in the tile (1 .. kTile)
  int t;             // tensor index
  bool vec;          // the tensor's data is 16-byte aligned: float4 loads
};

// The tensor holding `tile` (0 <= tile < tile_off[n]): the t with tile_off[t] <= tile <
// tile_off[t+1], found by binary search (tensors without tiles -- numel 0 -- are never returned).
// Every thread of a block computes it for the same tile (uniform, cached loads).
__device__ __forceinline__ Tile locate_tile(const Args& a, int64_t tile) {
  int lo = 0, hi = a.n;  // invariant: tile_off[lo] <= tile < tile_off[hi]
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (a.tile_off[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  Tile r;
  r.t = lo;
  r.ptr = a.ptrs[lo];
  r.numel = a.offsets[lo + 1] - a.offsets[lo];
  r.start = (tile - a.tile_off[lo]) * kTile;
  const int64_t left = r.numel - r.start;
  r.len = left < kTile ? static_cast<int>(left) : kTile;
  r.vec = (reinterpret_cast<uintptr_t>(r.ptr) & 15u) == 0;
  return r;
}

// Layout of a tile over the block: warp w owns the segment [w * kSeg, (w + 1) * kSeg) of the tile;
// its load i reads 128 consecutive entries, lane l getting entries 4l .. 4l+3 of them. So entry
// (w, i, l, c) is tile entry w * kSeg + i * 128 + 4 * l + c, and that tuple's lexicographic order
// is the index order (which the stable compaction relies on).
__device__ __forceinline__ int64_t first_entry(const Tile& r) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  return r.start + static_cast<int64_t>(warp) * kSeg + 4 * lane;  // + 128 * i + c
}

// Loads this thread's 32 entries of the tile (entries past the tensor's end read as 0, and the
// callers skip them). All loads are issued before any is used.
__device__ __forceinline__ void load_tile(const Tile& r, float (&x)[kVecs][4]) {
  const int64_t base = first_entry(r);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int64_t j = base + 128 * i;
    if (r.vec && j + 4 <= r.numel) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(r.ptr + j));
      x[i][0] = v.x;
      x[i][1] = v.y;
      x[i][2] = v.z;
      x[i][3] = v.w;
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) x[i][c] = (j + c < r.numel) ? __ldg(r.ptr + j + c) : 0.0f;
    }
  }
}

// Exclusive scan of per-(thread, load) counts in tile order (see first_entry). cnt[i] packs two
// 16-bit counts for this thread's entries of load i; excl[i] receives the packed counts of all
// tile entries before them, total the packed counts of the whole tile. Every thread of the block
// must call it (it synchronises the block twice); sh_warp holds kWarps values.
__device__ __forceinline__ void tile_scan(const uint32_t (&cnt)[kVecs], uint32_t (&excl)[kVecs], uint32_t& total,
                                          uint32_t* sh_warp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t run = 0;  // packed counts of this warp's earlier loads
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    uint32_t v = cnt[i];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const uint32_t y = __shfl_up_sync(kFullMask, v, d);
      if (lane >= d) v += y;
    }
    excl[i] = run + v - cnt[i];
    run += __shfl_sync(kFullMask, v, 31);
  }
  if (lane == 0) sh_warp[warp] = run;
  __syncthreads();
  uint32_t before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint32_t s = sh_warp[w];
    if (w < warp) before += s;
    all += s;
  }
#pragma unroll
  for (int i = 0; i < kVecs; ++i) excl[i] += before;
  total = all;
  __syncthreads();  // sh_warp may be reused after this
}

// Sum over the block of a packed per-thread value (every thread calls; two block barriers).
__device__ __forceinline__ uint32_t block_sum(uint32_t v, uint32_t* sh_warp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  if (lane == 0) sh_warp[warp] = v;
  __syncthreads();
  uint32_t all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) all += sh_warp[w];
  __syncthreads();
  return all;
}

// ---------------------------------------------------------------------------------------------
// Kernels

// One block of kChooseThreads. Builds tile_off by an exclusive scan of the per-tensor tile counts,
// initialises the State and the NaN sentinel.
__global__ void __launch_bounds__(kChooseThreads) init_kernel(Args a) {
  using Scan = cub::BlockScan<long long, kChooseThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ long long carry;
  if (threadIdx.x == 0) {
    carry = 0;
    State* st = a.st;
    st->buf_count = 0;
    st->k_rem = a.k;
    st->cand = a.total;
    st->prefix = 0;
    st->shift = 32;
    st->done = a.k == 0 ? 1 : 0;
    st->in_buffer = 0;
    *a.nan_tensor = LLONG_MAX;
  }
  __syncthreads();
  for (int base = 0; base < a.n; base += kChooseThreads) {
    const int t = base + static_cast<int>(threadIdx.x);
    long long tiles = 0;
    if (t < a.n) tiles = (a.offsets[t + 1] - a.offsets[t] + kTile - 1) / kTile;
    long long excl, sum;
    Scan(tmp).ExclusiveSum(tiles, excl, sum);
    if (t < a.n) a.tile_off[t] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += sum;
    __syncthreads();
  }
  if (threadIdx.x == 0) a.tile_off[a.n] = carry;
}

// Histogram pass PASS: counts digit PASS of the candidates (keys whose bits above the digit equal
// the prefix) into a.hist[PASS]. Reads the buffer when it holds the candidates, else every score
// (tiles over a persistent grid). Pass 0 also checks for NaN (even when k = 0, where it does
// nothing else). If the candidates now fit the buffer and none were buffered yet (passes 1, 2),
// the pass writes them to the buffer and stores, per tile, the number of entries whose bits above
// the digit exceed the prefix (selected whatever the remaining digits are).
template <int PASS>
__global__ void __launch_bounds__(kThreads) hist_kernel(Args a) {
  constexpr int kLo = Digit<PASS>::kLo;
  constexpr int kBins = 1 << Digit<PASS>::kBits;
  constexpr int kAbove = kLo + Digit<PASS>::kBits;  // shift of the prefix bits: 32, 21, 10
  constexpr uint32_t kMask = kBins - 1;
  __shared__ uint32_t sh_hist[kBins];
  __shared__ uint32_t sh_warp[kWarps];
  __shared__ unsigned long long sh_base;

  const State* st = a.st;
  const bool active = st->done == 0;
  if (PASS > 0 && !active) return;  // uniform: State is not written during this kernel
  const bool from_buffer = PASS > 0 && st->in_buffer != 0;
  const bool filter = PASS > 0 && active && !from_buffer && st->cand <= a.cap;
  const uint32_t prefix = st->prefix;

  for (int b = threadIdx.x; b < kBins; b += kThreads) sh_hist[b] = 0;
  __syncthreads();

  if (from_buffer) {
    const long long n_buf = static_cast<long long>(st->buf_count);
    for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n_buf;
         i += static_cast<long long>(gridDim.x) * kThreads) {
      const uint32_t key = a.buf_key[i];
      if (high_bits<kAbove>(key) == prefix) atomicAdd(&sh_hist[(key >> kLo) & kMask], 1u);
    }
  } else {
    const int lane = threadIdx.x & 31;
    const int64_t n_tiles = a.tile_off[a.n];
    for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
      const Tile r = locate_tile(a, tile);
      float x[kVecs][4];
      load_tile(r, x);
      const int64_t base = first_entry(r);
      const bool full = r.start + kTile <= r.numel;
      bool has_nan = false;
      uint32_t cnt[kVecs];  // packed: candidates | above << 16
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        uint32_t n_cand = 0, n_above = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (full || base + 128 * i + c < r.numel) {
            const float f = x[i][c];
            if (PASS == 0) has_nan |= isnan(f);
            if (active) {
              const uint32_t key = float_key(f);
              const uint32_t h = high_bits<kAbove>(key);
              if (h == prefix) {
                atomicAdd(&sh_hist[(key >> kLo) & kMask], 1u);
                ++n_cand;
              } else if (h > prefix) {
                ++n_above;
              }
            }
          }
        }
        cnt[i] = n_cand | (n_above << 16);
      }
      if (PASS == 0) {
        if (__any_sync(kFullMask, has_nan) && lane == 0) {
          atomicMin(reinterpret_cast<long long*>(a.nan_tensor), static_cast<long long>(r.t));
        }
      }
      if (filter) {  // uniform over the block
        uint32_t excl[kVecs], total;
        tile_scan(cnt, excl, total, sh_warp);
        if (threadIdx.x == 0) {
          const unsigned long long n_cand = total & 0xffffu;
          sh_base = n_cand ? atomicAdd(&a.st->buf_count, n_cand) : 0ull;
          a.tile_gt[tile] = total >> 16;
        }
        __syncthreads();
        const unsigned long long tile_base = sh_base;  // thread 0 rewrites it only after the next
                                                       // tile's tile_scan barriers
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
          unsigned long long pos = tile_base + (excl[i] & 0xffffu);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (full || base + 128 * i + c < r.numel) {
              const uint32_t key = float_key(x[i][c]);
              if (high_bits<kAbove>(key) == prefix) {
                if (pos < static_cast<unsigned long long>(a.cap)) {  // always true; defensive
                  a.buf_key[pos] = key;
                  a.buf_tile[pos] = static_cast<uint32_t>(tile);
                }
                ++pos;
              }
            }
          }
        }
      }
    }
  }

  __syncthreads();
  if (active) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      const uint32_t v = sh_hist[b];
      if (v != 0) atomicAdd(&a.hist[PASS][b], static_cast<unsigned long long>(v));
    }
  }
}

// One block of kChooseThreads: finds the bucket holding the k_rem-th largest candidate in
// a.hist[PASS] (suffix sums from the top bucket) and advances the State. Exactly one thread finds
// it, because 1 <= k_rem <= cand = the histogram's sum; it writes the State after a barrier that
// follows every thread's reads.
template <int PASS>
__global__ void __launch_bounds__(kChooseThreads) choose_kernel(Args a) {
  constexpr int kLo = Digit<PASS>::kLo;
  constexpr int kBitsD = Digit<PASS>::kBits;
  constexpr int kBins = 1 << kBitsD;
  constexpr int kPerThread = kBins / kChooseThreads;
  static_assert(kPerThread * kChooseThreads == kBins, "bins must split evenly over the block");
  using Scan = cub::BlockScan<unsigned long long, kChooseThreads>;
  __shared__ typename Scan::TempStorage tmp;

  State* st = a.st;
  if (st->done) return;  // uniform
  const long long k_rem = st->k_rem;
  const uint32_t prefix = st->prefix;
  // The same decision hist_kernel<PASS> took from the same State: did that pass fill the buffer?
  const bool filtered = PASS > 0 && st->in_buffer == 0 && st->cand <= a.cap;

  // Thread i holds the buckets in descending order: position q = i * kPerThread + m is bucket
  // kBins - 1 - q, so the inclusive scan gives the number of candidates in buckets >= it.
  unsigned long long v[kPerThread], incl[kPerThread];
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) v[m] = a.hist[PASS][kBins - 1 - (threadIdx.x * kPerThread + m)];
  __syncthreads();  // every read of the State precedes the write below
  Scan(tmp).InclusiveSum(v, incl);
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) {
    const long long above = static_cast<long long>(incl[m] - v[m]);
    if (above < k_rem && static_cast<long long>(incl[m]) >= k_rem) {
      const uint32_t bucket = static_cast<uint32_t>(kBins - 1 - (threadIdx.x * kPerThread + m));
      const long long rem = k_rem - above;
      st->prefix = (prefix << kBitsD) | bucket;
      st->shift = kLo;
      st->k_rem = rem;
      st->cand = static_cast<long long>(v[m]);
      st->done = (kLo == 0 || static_cast<long long>(v[m]) == rem) ? 1 : 0;  // early stop: whole bucket
      if (filtered) st->in_buffer = 1;
    }
  }
}

// Per-tile counts from the buffer (only when it was filled): its entries all carry the prefix of
// the filtering pass; those above / equal to the final prefix are added to their tile's counts
// (tile_gt already holds the tile's entries above the filtering pass's prefix; tile_eq is zero).
__global__ void __launch_bounds__(kThreads) buffer_count_kernel(Args a) {
  const State* st = a.st;
  if (st->in_buffer == 0) return;
  const uint32_t prefix = st->prefix;
  const int shift = st->shift;
  const long long n_buf = static_cast<long long>(st->buf_count);
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n_buf;
       i += static_cast<long long>(gridDim.x) * kThreads) {
    const uint32_t h = a.buf_key[i] >> shift;
    if (h > prefix) {
      atomicAdd(&a.tile_gt[a.buf_tile[i]], 1ull);
    } else if (h == prefix) {
      atomicAdd(&a.tile_eq[a.buf_tile[i]], 1ull);
    }
  }
}

// Per-tile counts by a full read (only when nothing was buffered): entries whose key bits above
// the final shift are greater than / equal to the final prefix.
__global__ void __launch_bounds__(kThreads) full_count_kernel(Args a) {
  __shared__ uint32_t sh_warp[kWarps];
  const State* st = a.st;
  if (st->in_buffer != 0) return;
  const uint32_t prefix = st->prefix;
  const int shift = st->shift;
  const int64_t n_tiles = a.tile_off[a.n];
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const Tile r = locate_tile(a, tile);
    float x[kVecs][4];
    load_tile(r, x);
    const int64_t base = first_entry(r);
    const bool full = r.start + kTile <= r.numel;
    uint32_t mine = 0;  // packed: above | equal << 16 (at most 32 each)
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (full || base + 128 * i + c < r.numel) {
          const uint32_t h = float_key(x[i][c]) >> shift;
          mine += (h > prefix) ? 1u : (h == prefix ? (1u << 16) : 0u);
        }
      }
    }
    const uint32_t total = block_sum(mine, sh_warp);
    if (threadIdx.x == 0) {
      a.tile_gt[tile] = total & 0xffffu;
      a.tile_eq[tile] = total >> 16;
    }
  }
}

// Output position of a tile's first selected entry: the selected entries before it, i.e. all
// those above the threshold plus the first min(k_rem, ties before it) ties.
__device__ __forceinline__ long long tile_out_start(const Args& a, int64_t tile, long long k_rem) {
  const long long eq_before = static_cast<long long>(a.eq_excl[tile]);
  return static_cast<long long>(a.gt_excl[tile]) + (eq_before < k_rem ? eq_before : k_rem);
}

// starts[t] for t = 0..n (the output position of tensor t's first tile; k past the last tile),
// and the NaN result: -1 when no tensor holds a NaN.
__global__ void starts_kernel(Args a) {
  const long long k_rem = a.st->k_rem;
  const int64_t n_tiles = a.tile_off[a.n];
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t <= a.n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = a.tile_off[t];
    long long s;
    if (a.k == 0) {
      s = 0;
    } else if (first < n_tiles) {
      s = tile_out_start(a, first, k_rem);
    } else {
      s = a.k;
    }
    a.starts[t] = s;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && *a.nan_tensor == LLONG_MAX) *a.nan_tensor = -1;
}

// Phase 2: the stable compaction. Per tile: selected = entries above the final prefix, plus the
// tile's ties whose global tie rank is below k_rem. A tile with nothing selected is skipped; a
// tile selected whole is written without reading the scores; otherwise its entries are read,
// ranked in index order within the tile (tile_scan) and written at out_start + rank.
__global__ void __launch_bounds__(kThreads) write_kernel(Args a) {
  __shared__ uint32_t sh_warp[kWarps];
  const State* st = a.st;
  const uint32_t prefix = st->prefix;
  const int shift = st->shift;
  const long long k_rem = st->k_rem;
  const int64_t n_tiles = a.tile_off[a.n];
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const long long tgt = static_cast<long long>(a.tile_gt[tile]);
    const long long teq = static_cast<long long>(a.tile_eq[tile]);
    long long ties = k_rem - static_cast<long long>(a.eq_excl[tile]);  // ties of this tile to take
    ties = ties < 0 ? 0 : (ties > teq ? teq : ties);
    const long long n_sel = tgt + ties;
    if (n_sel == 0) continue;  // uniform over the block
    const Tile r = locate_tile(a, tile);
    const long long out_start = tile_out_start(a, tile, k_rem);  // global output position
    // Destination: out[g - sub] for global output position g, bounded by limit.
    int64_t* out;
    long long sub, limit;
    if (a.out_concat != nullptr) {
      out = a.out_concat;
      sub = 0;
      limit = a.k;
    } else {
      out = a.out_ptrs[r.t];
      sub = a.starts[r.t];
      limit = a.starts[r.t + 1];
    }
    if (n_sel == r.len) {  // every entry of the tile selected
      for (int e = threadIdx.x; e < r.len; e += kThreads) {
        if (out_start + e < limit) out[out_start + e - sub] = r.start + e;
      }
      continue;
    }
    float x[kVecs][4];
    load_tile(r, x);
    const int64_t base = first_entry(r);
    const bool full = r.start + kTile <= r.numel;
    uint32_t cnt[kVecs];  // packed: above | equal << 16
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      uint32_t v = 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (full || base + 128 * i + c < r.numel) {
          const uint32_t h = float_key(x[i][c]) >> shift;
          v += (h > prefix) ? 1u : (h == prefix ? (1u << 16) : 0u);
        }
      }
      cnt[i] = v;
    }
    uint32_t excl[kVecs], total;
    tile_scan(cnt, excl, total, sh_warp);
    const uint32_t tie_cap = static_cast<uint32_t>(ties);  // <= kTile
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      uint32_t gt_rank = excl[i] & 0xffffu;  // above-threshold entries of the tile before this one
      uint32_t eq_rank = excl[i] >> 16;      // ties of the tile before this one
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = base + 128 * i + c;
        if (full || j < r.numel) {
          const uint32_t h = float_key(x[i][c]) >> shift;
          if (h > prefix) {
            const long long g = out_start + gt_rank + (eq_rank < tie_cap ? eq_rank : tie_cap);
            if (g < limit) out[g - sub] = j;
            ++gt_rank;
          } else if (h == prefix) {
            if (eq_rank < tie_cap) {
              const long long g = out_start + gt_rank + eq_rank;
              if (g < limit) out[g - sub] = j;
            }
            ++eq_rank;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Workspace layout (byte offsets from the workspace start). The span [hist0, tile_eq + its size)
// is zeroed by one memset at the start of phase 1.
struct Layout {
  int64_t n_tiles_max;  // >= the number of tiles: sum over t of ceil(numel_t / kTile)
  int64_t cap;          // buffer capacity, entries
  size_t state, hist[3], tile_gt, tile_eq, zero_end, gt_excl, eq_excl, tile_off, buf_key, buf_tile, cub_temp;
  size_t cub_bytes, bytes;
};

cudaError_t make_layout(int64_t total, int n_tensors, Layout* L) {
  if (total < 0 || n_tensors < 0) return cudaErrorInvalidValue;
  // sum_t ceil(numel_t / kTile) <= sum_t (numel_t / kTile + 1) <= ceil(total / kTile) + n.
  L->n_tiles_max = (total + kTile - 1) / kTile + n_tensors;
  if (L->n_tiles_max > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidValue;  // 32-bit tile ids
  L->cap = total <= kBufMin ? total : (total / kBufDiv > kBufMin ? total / kBufDiv : kBufMin);
  const size_t tiles = static_cast<size_t>(L->n_tiles_max) > 0 ? static_cast<size_t>(L->n_tiles_max) : 1;
  size_t o = 0;
  L->state = o;
  o += align_up(sizeof(State));
  const int bins[3] = {1 << Digit<0>::kBits, 1 << Digit<1>::kBits, 1 << Digit<2>::kBits};
  for (int p = 0; p < 3; ++p) {
    L->hist[p] = o;
    o += align_up(sizeof(unsigned long long) * bins[p]);
  }
  L->tile_gt = o;
  o += align_up(sizeof(unsigned long long) * tiles);
  L->tile_eq = o;
  o += align_up(sizeof(unsigned long long) * tiles);
  L->zero_end = o;
  L->gt_excl = o;
  o += align_up(sizeof(unsigned long long) * tiles);
  L->eq_excl = o;
  o += align_up(sizeof(unsigned long long) * tiles);
  L->tile_off = o;
  o += align_up(sizeof(int64_t) * (static_cast<size_t>(n_tensors) + 1));
  L->buf_key = o;
  o += align_up(sizeof(uint32_t) * static_cast<size_t>(L->cap > 0 ? L->cap : 1));
  L->buf_tile = o;
  o += align_up(sizeof(uint32_t) * static_cast<size_t>(L->cap > 0 ? L->cap : 1));
  L->cub_temp = o;
  L->cub_bytes = 0;
  cudaError_t e = cub::DeviceScan::ExclusiveSum(nullptr, L->cub_bytes, static_cast<const unsigned long long*>(nullptr),
                                                static_cast<unsigned long long*>(nullptr),
                                                static_cast<int>(L->n_tiles_max));
  if (e != cudaSuccess) return e;
  o += align_up(L->cub_bytes > 0 ? L->cub_bytes : 1);
  L->bytes = o;
  return cudaSuccess;
}

Args make_args(const Layout& L, void* ws, const float* const* d_ptrs, const int64_t* d_offsets, int n,
               int64_t total, int64_t k) {
  char* w = static_cast<char*>(ws);
  Args a;
  a.ptrs = d_ptrs;
  a.offsets = d_offsets;
  a.n = n;
  a.total = total;
  a.k = k;
  a.st = reinterpret_cast<State*>(w + L.state);
  for (int p = 0; p < 3; ++p) a.hist[p] = reinterpret_cast<unsigned long long*>(w + L.hist[p]);
  a.tile_off = reinterpret_cast<int64_t*>(w + L.tile_off);
  a.tile_gt = reinterpret_cast<unsigned long long*>(w + L.tile_gt);
  a.tile_eq = reinterpret_cast<unsigned long long*>(w + L.tile_eq);
  a.gt_excl = reinterpret_cast<unsigned long long*>(w + L.gt_excl);
  a.eq_excl = reinterpret_cast<unsigned long long*>(w + L.eq_excl);
  a.buf_key = reinterpret_cast<uint32_t*>(w + L.buf_key);
  a.buf_tile = reinterpret_cast<uint32_t*>(w + L.buf_tile);
  a.cap = L.cap;
  a.starts = nullptr;
  a.nan_tensor = nullptr;
  a.out_ptrs = nullptr;
  a.out_concat = nullptr;
  return a;
}

// Persistent grid for the tile kernels: kBlocksPerSm blocks per SM, no more blocks than tiles, and
// enough that no block handles more than kMaxTilesPerBlock tiles (its 32-bit shared counters).
cudaError_t tile_grid(int64_t n_tiles_max, int* grid) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  int64_t g = static_cast<int64_t>(sms) * kBlocksPerSm;
  if (g > n_tiles_max) g = n_tiles_max;
  const int64_t g_min = (n_tiles_max + kMaxTilesPerBlock - 1) / kMaxTilesPerBlock;
  if (g < g_min) g = g_min;
  if (g < 1) g = 1;
  *grid = static_cast<int>(g);
  return cudaSuccess;
}

cudaError_t check_common(const float* const* d_ptrs, const int64_t* d_offsets, int n_tensors, int64_t total,
                         int64_t k, void* d_workspace, size_t workspace_bytes, Layout* L) {
  if (n_tensors < 0 || total < 0 || k < 0 || k > total) return cudaErrorInvalidValue;
  if (n_tensors > 0 && (d_ptrs == nullptr || d_offsets == nullptr)) return cudaErrorInvalidValue;
  cudaError_t e = make_layout(total, n_tensors, L);
  if (e != cudaSuccess) return e;
  if (d_workspace == nullptr || workspace_bytes < L->bytes) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(d_workspace) % kAlign) != 0) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace
}  // namespace fishkern_topk

using namespace fishkern_topk;

extern "C" int fishkern_topk_workspace_bytes(int64_t total, int n_tensors, int64_t k, size_t* bytes) {
  if (bytes == nullptr || k < 0 || k > total) return cudaErrorInvalidValue;
  Layout L;
  const cudaError_t e = make_layout(total, n_tensors, &L);
  if (e != cudaSuccess) return e;
  *bytes = L.bytes;
  return cudaSuccess;
}

extern "C" int fishkern_topk_select_cuda(const float* const* d_ptrs, const int64_t* d_offsets, int n_tensors,
                                         int64_t total, int64_t k, int64_t* d_tensor_starts, int64_t* d_nan_tensor,
                                         void* d_workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (d_tensor_starts == nullptr || d_nan_tensor == nullptr) return cudaErrorInvalidValue;
  if (n_tensors == 0) {  // nothing to read: starts = {0}, no NaN
    if (total != 0 || k != 0) return cudaErrorInvalidValue;
    cudaError_t e = cudaMemsetAsync(d_tensor_starts, 0, sizeof(int64_t), stream);
    if (e != cudaSuccess) return e;
    return cudaMemsetAsync(d_nan_tensor, 0xff, sizeof(int64_t), stream);  // all ones: -1
  }
  Layout L;
  cudaError_t e = check_common(d_ptrs, d_offsets, n_tensors, total, k, d_workspace, workspace_bytes, &L);
  if (e != cudaSuccess) return e;
  int grid = 1;
  e = tile_grid(L.n_tiles_max, &grid);
  if (e != cudaSuccess) return e;
  Args a = make_args(L, d_workspace, d_ptrs, d_offsets, n_tensors, total, k);
  a.starts = d_tensor_starts;
  a.nan_tensor = d_nan_tensor;
  char* w = static_cast<char*>(d_workspace);

  e = cudaMemsetAsync(w + L.hist[0], 0, L.zero_end - L.hist[0], stream);  // histograms, tile counts
  if (e != cudaSuccess) return e;
  init_kernel<<<1, kChooseThreads, 0, stream>>>(a);
  hist_kernel<0><<<grid, kThreads, 0, stream>>>(a);  // also the NaN check when k = 0
  if (k > 0) {
    choose_kernel<0><<<1, kChooseThreads, 0, stream>>>(a);
    hist_kernel<1><<<grid, kThreads, 0, stream>>>(a);
    choose_kernel<1><<<1, kChooseThreads, 0, stream>>>(a);
    hist_kernel<2><<<grid, kThreads, 0, stream>>>(a);
    choose_kernel<2><<<1, kChooseThreads, 0, stream>>>(a);
    buffer_count_kernel<<<grid, kThreads, 0, stream>>>(a);
    full_count_kernel<<<grid, kThreads, 0, stream>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    size_t cub_bytes = L.cub_bytes;
    e = cub::DeviceScan::ExclusiveSum(w + L.cub_temp, cub_bytes, a.tile_gt, a.gt_excl,
                                      static_cast<int>(L.n_tiles_max), stream);
    if (e != cudaSuccess) return e;
    cub_bytes = L.cub_bytes;
    e = cub::DeviceScan::ExclusiveSum(w + L.cub_temp, cub_bytes, a.tile_eq, a.eq_excl,
                                      static_cast<int>(L.n_tiles_max), stream);
    if (e != cudaSuccess) return e;
  }
  const int64_t starts_blocks = (static_cast<int64_t>(n_tensors) + kThreads) / kThreads;  // n + 1 entries
  starts_kernel<<<static_cast<unsigned>(starts_blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

extern "C" int fishkern_topk_write_cuda(const float* const* d_ptrs, const int64_t* d_offsets, int n_tensors,
                                        int64_t total, int64_t k, const int64_t* d_tensor_starts,
                                        int64_t* const* d_out_ptrs, int64_t* d_out_concat, void* d_workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
  if ((d_out_ptrs == nullptr) == (d_out_concat == nullptr)) return cudaErrorInvalidValue;
  if (d_out_concat == nullptr && d_tensor_starts == nullptr) return cudaErrorInvalidValue;
  if (n_tensors == 0 || k == 0) return (n_tensors >= 0 && k >= 0 && k <= total) ? cudaSuccess : cudaErrorInvalidValue;
  Layout L;
  cudaError_t e = check_common(d_ptrs, d_offsets, n_tensors, total, k, d_workspace, workspace_bytes, &L);
  if (e != cudaSuccess) return e;
  int grid = 1;
  e = tile_grid(L.n_tiles_max, &grid);
  if (e != cudaSuccess) return e;
  Args a = make_args(L, d_workspace, d_ptrs, d_offsets, n_tensors, total, k);
  a.starts = const_cast<int64_t*>(d_tensor_starts);  // read only in phase 2
  a.out_ptrs = d_out_ptrs;
  a.out_concat = d_out_concat;
  write_kernel<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}
