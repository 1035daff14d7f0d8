// CPU implementation of fishkern::topk_select: exact global top-k over many fp32 tensors.
//
// Radix select on order-preserving 32-bit keys (11 + 11 + 10 bit digits), multi-threaded with
// at::parallel_for over chunks of at most 1M entries of one tensor each (the tensors are read in
// place through a table of pointers, never concatenated). Typical case: two full reads of the scores
//   pass 1: histogram of the top 11 bits (and NaN detection);
//   pass 2: per chunk, collect the indices whose top digit lies above the threshold bucket (all of
//           them are selected, at most k) and the (key, index) candidates inside it;
// then the last 21 bits are resolved on the candidates alone, and each chunk's selection is merged
// in index order. If the threshold bucket is too large to collect (degenerate scores, e.g. most of
// them equal), the remaining digits are found by rescans and the selection is written by a counting
// pass plus a writing pass (at most five reads, memory O(k)).
//
// Ties at the threshold go to the lowest global flat index (torch.topk's rule); -0.0 equals +0.0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace fishkern {
namespace {

constexpr int64_t kChunk = int64_t(1) << 20;

inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (u == 0x80000000u) u = 0u;                       // -0.0 ranks as +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // larger float -> larger key
}

struct Chunk {
  int64_t tensor;
  int64_t begin;  // local flat range [begin, end) of that tensor
  int64_t end;
};

// Digit d of a key: d = 0 -> bits 21..31, d = 1 -> bits 10..20, d = 2 -> bits 0..9.
constexpr int kShift[3] = {21, 10, 0};
constexpr int kBits[3] = {11, 11, 10};
inline uint32_t digit(uint32_t key, int d) { return (key >> kShift[d]) & ((1u << kBits[d]) - 1u); }
// The key bits above digit d (those already fixed when digit d is examined).
inline uint32_t high_bits(uint32_t key, int d) { return d == 0 ? 0u : key >> (kShift[d] + kBits[d]); }

// The selection rule found by the radix passes: every key > threshold, plus the first `ties`
// keys == threshold in global index order. threshold = -1 selects everything.
struct Rule {
  int64_t threshold;
  int64_t ties;
};

// Walk a histogram from the top bucket down to the one holding the k-th largest.
inline void find_bucket(const std::vector<int64_t>& hist, int64_t k, uint32_t* bucket, int64_t* above) {
  int64_t acc = 0;
  for (int64_t b = static_cast<int64_t>(hist.size()) - 1; b >= 0; --b) {
    if (acc + hist[b] >= k) {
      *bucket = static_cast<uint32_t>(b);
      *above = acc;
      return;
    }
    acc += hist[b];
  }
  TORCH_CHECK(false, "topk_select: internal error, histogram holds fewer than k entries");
}

// Fix the digits below the top one. `fill_hist(d, prefix, hist)` must count, by digit d, every key
// whose bits above digit d equal `prefix`. Starts from top bucket b0 holding `count` keys, of which
// the r largest are wanted; stops early once a whole bucket is wanted. Returns the selection rule.
template <typename FillHist>
Rule resolve_low_digits(uint32_t b0, int64_t count, int64_t r, FillHist&& fill_hist) {
  uint32_t prefix = b0;
  int fixed = 1;
  for (int d = 1; d < 3 && count != r; ++d) {
    std::vector<int64_t> hist(size_t(1) << kBits[d], 0);
    fill_hist(d, prefix, hist);
    uint32_t b;
    int64_t above;
    find_bucket(hist, r, &b, &above);
    r -= above;
    count = hist[b];
    prefix = (prefix << kBits[d]) | b;
    fixed = d + 1;
  }
  int low = 32;  // key bits below the fixed prefix
  for (int d = 0; d < fixed; ++d) low -= kBits[d];
  const int64_t lowest = static_cast<int64_t>(prefix) << low;
  // A whole bucket wanted: every key >= its lowest key (keys above it are all wanted anyway).
  return count == r ? Rule{lowest - 1, 0} : Rule{lowest, r};
}

}  // namespace

std::vector<at::Tensor> topk_select_cpu(at::TensorList scores, int64_t k) {
  const int64_t n = static_cast<int64_t>(scores.size());
  std::vector<at::Tensor> inputs;
  std::vector<const float*> ptrs(n);
  std::vector<int64_t> numel(n), offset(n + 1, 0);
  inputs.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = scores[i];
    TORCH_CHECK(t.device().is_cpu(), "topk_select: score tensor ", i, " is on ", t.device(), "; all must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kFloat, "topk_select: score tensor ", i, " has dtype ", t.scalar_type(),
                "; scores must be float32");
    inputs.push_back(t.contiguous());
    ptrs[i] = inputs.back().data_ptr<float>();
    numel[i] = t.numel();
    offset[i + 1] = offset[i] + numel[i];
  }
  const int64_t total = offset[n];
  TORCH_CHECK(k >= 0 && k <= total, "topk_select: k = ", k, " must lie in [0, ", total, "] (the number of scores)");

  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < numel[i]; b += kChunk) chunks.push_back({i, b, std::min(numel[i], b + kChunk)});
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::mutex mu;

  // ---- pass 1: top-digit histogram, NaN check
  std::vector<int64_t> hist0(size_t(1) << kBits[0], 0);
  int64_t nan_tensor = std::numeric_limits<int64_t>::max();
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int64_t> local(hist0.size(), 0);
    int64_t local_nan = std::numeric_limits<int64_t>::max();
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const float* p = ptrs[ch.tensor];
      for (int64_t j = ch.begin; j < ch.end; ++j) {
        const float f = p[j];
        if (f != f) {
          local_nan = std::min(local_nan, ch.tensor);
          continue;
        }
        ++local[order_key(f) >> kShift[0]];
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (size_t b = 0; b < local.size(); ++b) hist0[b] += local[b];
    nan_tensor = std::min(nan_tensor, local_nan);
  });
  TORCH_CHECK(nan_tensor == std::numeric_limits<int64_t>::max(), "topk_select: score tensor ", nan_tensor,
              " contains NaN; scores must be numbers (±inf are allowed)");

  std::vector<at::Tensor> out(n);
  auto opts = at::TensorOptions().dtype(at::kLong);
  if (k == 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = at::empty({0}, opts);
    return out;
  }
  uint32_t b0;
  int64_t above0;
  find_bucket(hist0, k, &b0, &above0);
  const int64_t count0 = hist0[b0];
  const int64_t r0 = k - above0;

  // Per chunk, the selected local indices in ascending order, filled by either path.
  std::vector<std::vector<int64_t>> picked(n_chunks);
  const int64_t collect_limit = std::max<int64_t>(4 * k, total / 16);
  if (count0 <= collect_limit) {
    // ---- pass 2: collect sure picks and candidates of the threshold bucket
    std::vector<std::vector<int64_t>> sure(n_chunks), cand_idx(n_chunks);
    std::vector<std::vector<uint32_t>> cand_key(n_chunks);
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const float* p = ptrs[ch.tensor];
        for (int64_t j = ch.begin; j < ch.end; ++j) {
          const uint32_t key = order_key(p[j]);
          const uint32_t top = key >> kShift[0];
          if (top > b0) {
            sure[c].push_back(j);
          } else if (top == b0) {
            cand_idx[c].push_back(j);
            cand_key[c].push_back(key);
          }
        }
      }
    });
    // ---- resolve the remaining digits on the candidates
    const Rule rule = resolve_low_digits(b0, count0, r0, [&](int d, uint32_t prefix, std::vector<int64_t>& hist) {
      for (int64_t c = 0; c < n_chunks; ++c)
        for (uint32_t key : cand_key[c])
          if (high_bits(key, d) == prefix) ++hist[digit(key, d)];
    });
    // ---- merge each chunk's picks in index order; ties go to the lowest global index
    std::vector<int64_t> ties_before(n_chunks + 1, 0);
    for (int64_t c = 0; c < n_chunks; ++c) {
      int64_t eq = 0;
      for (uint32_t key : cand_key[c]) eq += static_cast<int64_t>(key) == rule.threshold;
      ties_before[c + 1] = ties_before[c] + eq;
    }
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t tie_rank = ties_before[c];
        const auto& s = sure[c];
        const auto& ci = cand_idx[c];
        const auto& ck = cand_key[c];
        std::vector<int64_t>& dst = picked[c];
        dst.reserve(s.size() + ci.size());
        size_t a = 0;
        for (size_t j = 0; j < ci.size(); ++j) {
          const int64_t key = ck[j];
          bool take = key > rule.threshold;
          if (key == rule.threshold) take = tie_rank++ < rule.ties;
          if (!take) continue;
          while (a < s.size() && s[a] < ci[j]) dst.push_back(s[a++]);
          dst.push_back(ci[j]);
        }
        while (a < s.size()) dst.push_back(s[a++]);
      }
    });
  } else {
    // ---- degenerate bucket: rescan for the remaining digits (memory stays O(k))
    const Rule rule = resolve_low_digits(b0, count0, r0, [&](int d, uint32_t prefix, std::vector<int64_t>& hist) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
        std::vector<int64_t> local(hist.size(), 0);
        for (int64_t c = cb; c < ce; ++c) {
          const Chunk& ch = chunks[c];
          const float* p = ptrs[ch.tensor];
          for (int64_t j = ch.begin; j < ch.end; ++j) {
            const uint32_t key = order_key(p[j]);
            if (high_bits(key, d) == prefix) ++local[digit(key, d)];
          }
        }
        std::lock_guard<std::mutex> lock(mu);
        for (size_t b = 0; b < local.size(); ++b) hist[b] += local[b];
      });
    });
    // counting pass: ties per chunk, for the global tie order
    std::vector<int64_t> ties_before(n_chunks + 1, 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const float* p = ptrs[ch.tensor];
        int64_t eq = 0;
        for (int64_t j = ch.begin; j < ch.end; ++j) eq += static_cast<int64_t>(order_key(p[j])) == rule.threshold;
        ties_before[c + 1] = eq;
      }
    });
    for (int64_t c = 0; c < n_chunks; ++c) ties_before[c + 1] += ties_before[c];
    // writing pass
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const float* p = ptrs[ch.tensor];
        int64_t tie_rank = ties_before[c];
        std::vector<int64_t>& dst = picked[c];
        for (int64_t j = ch.begin; j < ch.end; ++j) {
          const int64_t key = order_key(p[j]);
          if (key > rule.threshold || (key == rule.threshold && tie_rank++ < rule.ties)) dst.push_back(j);
        }
      }
    });
  }

  // ---- per-tensor outputs: concatenate the tensor's chunks (already in index order)
  std::vector<int64_t> chunk_pos(n_chunks, 0), tensor_count(n, 0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    chunk_pos[c] = tensor_count[chunks[c].tensor];
    tensor_count[chunks[c].tensor] += static_cast<int64_t>(picked[c].size());
  }
  std::vector<int64_t*> out_ptr(n, nullptr);
  int64_t found = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = at::empty({tensor_count[i]}, opts);
    out_ptr[i] = out[i].data_ptr<int64_t>();
    found += tensor_count[i];
  }
  TORCH_CHECK(found == k, "topk_select: internal error, selected ", found, " entries instead of ", k);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      std::copy(picked[c].begin(), picked[c].end(), out_ptr[chunks[c].tensor] + chunk_pos[c]);
  });
  return out;
}

// The op is declared in Python (fishkern/topk/ops.py, with its fake and the plain-PyTorch default
// kernel); this adds the CPU kernel. Registering it before the declaration is fine.
TORCH_LIBRARY_IMPL(fishkern, CPU, m) { m.impl("topk_select", &topk_select_cpu); }

}  // namespace fishkern
