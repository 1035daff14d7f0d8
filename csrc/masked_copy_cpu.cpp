// CPU gather / scatter of masked entries for many tensors in one call (the data movement of the
// masked optimizers' PyTorch path; the update arithmetic stays in PyTorch ops).
//
//   gather_masked(srcs, index, begins, ends, out):    out[e] = srcs[i].flat[index[e]]
//   scatter_masked_(dsts, index, begins, ends, values): dsts[i].flat[index[e]] = values[e]
//
// for every e in [begins[i], ends[i]) (tensor i's segment of the flat buffers). `index` holds memory offsets into each tensor's dense storage
// (int32 or int64), `out` / `values` are flat float32/float64 buffers, the tensors may be float32,
// float64, bfloat16 or float16 (converted with round-to-nearest-even, as Tensor.to does). Work is
// split into blocks of entries that never straddle two tensors and run on torch's intra-op threads.
//
// Users can call torch.ops.fishkern.* directly, so every argument is checked before any copy
// starts: devices, dtypes, layouts, segments (in order, disjoint, inside the buffers), no overlap
// of the written tensors with the index. Every index must lie inside its tensor: scatter
// checks them all first (one extra read of the index; a bad call changes nothing), gather checks
// each block just before copying it (a bad call leaves `out` partly written).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace fishkern {
namespace {

constexpr int64_t kBlock = 16384;

struct Block {
  int64_t tensor;
  int64_t begin;  // flat range [begin, end) of the index / value buffers
  int64_t end;
};

std::vector<Block> make_blocks(at::IntArrayRef begins, at::IntArrayRef ends) {
  std::vector<Block> blocks;
  for (size_t i = 0; i < begins.size(); ++i)
    for (int64_t b = begins[i]; b < ends[i]; b += kBlock)
      blocks.push_back({static_cast<int64_t>(i), b, std::min(ends[i], b + kBlock)});
  return blocks;
}

// The op's argument names, for error messages that say which argument is wrong.
struct Names {
  const char* op;
  const char* tensors;  // "srcs" / "dsts"
  const char* flat;     // "out" / "values"
  bool writes_tensors;  // scatter writes the tensors, gather the flat buffer
};

bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Everything but the index values (O(number of tensors)).
void check_args(const Names& nm, at::TensorList tensors, const at::Tensor& index, at::IntArrayRef begins,
                at::IntArrayRef ends, const at::Tensor& flat) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(static_cast<int64_t>(begins.size()) == n && static_cast<int64_t>(ends.size()) == n, nm.op, ": ",
              nm.tensors, " has ", n, " tensors but begins has ", begins.size(), " and ends ", ends.size(),
              " entries; begins and ends must have one entry per tensor");
  TORCH_CHECK(index.device().is_cpu(), nm.op, ": index is on ", index.device(), "; expected a CPU tensor");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, nm.op, ": index has dtype ",
              index.scalar_type(), "; expected int32 or int64");
  TORCH_CHECK(index.dim() == 1 && index.is_contiguous(), nm.op, ": index must be a contiguous 1-D tensor, got shape ",
              index.sizes(), " with strides ", index.strides());
  TORCH_CHECK(flat.device().is_cpu(), nm.op, ": ", nm.flat, " is on ", flat.device(), "; expected a CPU tensor");
  TORCH_CHECK(flat.scalar_type() == at::kFloat || flat.scalar_type() == at::kDouble, nm.op, ": ", nm.flat,
              " has dtype ", flat.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous(), nm.op, ": ", nm.flat,
              " must be a contiguous 1-D tensor, got shape ", flat.sizes(), " with strides ", flat.strides());
  // a write into the index while the kernel reads it would turn later indices into garbage
  auto check_not_index = [&](const at::Tensor& written, const char* name, int64_t i) {
    TORCH_CHECK(at::get_overlap_status(written, index) == at::MemOverlapStatus::No, nm.op, ": ", name,
                (i < 0 ? std::string() : "[" + std::to_string(i) + "]"),
                " shares memory with index; the written tensor must not overlap the index");
  };
  if (!nm.writes_tensors) check_not_index(flat, nm.flat, -1);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), nm.op, ": ", nm.tensors, "[", i, "] is on ", t.device(), "; expected a CPU tensor");
    TORCH_CHECK(is_param_dtype(t.scalar_type()), nm.op, ": ", nm.tensors, "[", i, "] has dtype ", t.scalar_type(),
                "; expected float32, float64, bfloat16 or float16");
    // the kernels address the tensor's memory block as numel() elements from data_ptr()
    TORCH_CHECK(t.is_non_overlapping_and_dense(), nm.op, ": ", nm.tensors, "[", i,
                "] must be non-overlapping and dense (contiguous or a permutation of it), got shape ", t.sizes(),
                " with strides ", t.strides());
    if (nm.writes_tensors) check_not_index(t, nm.tensors, i);  // after the layout check: exact for dense tensors
    TORCH_CHECK(0 <= begins[i] && begins[i] <= ends[i] && ends[i] <= index.numel() && ends[i] <= flat.numel(), nm.op,
                ": segment ", i, " [begins[", i, "], ends[", i, "]) = [", begins[i], ", ", ends[i],
                ") is outside the index / ", nm.flat, " buffers (", index.numel(), " / ", flat.numel(),
                " entries) or reversed");
    // in order and disjoint, so that parallel blocks never write the same entry
    TORCH_CHECK(i == 0 || ends[i - 1] <= begins[i], nm.op, ": segment ", i, " starts at ", begins[i],
                " before segment ", i - 1, " ends (", ends[i - 1], "); segments must be in order and disjoint");
  }
}

// Whether some v[0, n) >= limit, OR-reduced without an early exit so that it vectorises; built
// for AVX2 too where the toolchain can pick the variant at load time (x86-64 Linux), which halves
// its cost there.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define FISHKERN_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FISHKERN_AVX2_CLONES
#endif
template <typename U>
inline bool any_at_least(const U* v, int64_t n, U limit) {
  U acc = 0;
  for (int64_t j = 0; j < n; ++j) acc |= v[j] >= limit;
  return acc != 0;
}
FISHKERN_AVX2_CLONES bool any_at_least32(const uint32_t* v, int64_t n, uint32_t limit) { return any_at_least(v, n, limit); }
FISHKERN_AVX2_CLONES bool any_at_least64(const uint64_t* v, int64_t n, uint64_t limit) { return any_at_least(v, n, limit); }

// Whether some idx[0, n) lies outside [0, numel): negative indices read as unsigned are huge.
template <typename index_t>
bool any_outside(const index_t* idx, int64_t n, int64_t numel) {
  using U = std::make_unsigned_t<index_t>;
  // a tensor larger than the index type's range: only negative indices are outside
  const int64_t top = static_cast<int64_t>(std::numeric_limits<index_t>::max());
  const U limit = numel > top ? static_cast<U>(top) + 1 : static_cast<U>(numel);
  const U* v = reinterpret_cast<const U*>(idx);
  if constexpr (sizeof(U) == 4) {
    return any_at_least32(v, n, limit);
  } else {
    return any_at_least64(v, n, limit);
  }
}

// Raise for the first entry outside its tensor among the blocks flagged in `bad`.
template <typename index_t>
void raise_first_outside(const Names& nm, at::TensorList tensors, const index_t* idx, const std::vector<Block>& blocks,
                         const std::vector<char>& bad) {
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (!bad[b]) continue;
    const Block& bl = blocks[b];
    const int64_t numel = tensors[bl.tensor].numel();
    for (int64_t e = bl.begin; e < bl.end; ++e)
      TORCH_CHECK(idx[e] >= 0 && idx[e] < numel, nm.op, ": index[", e, "] = ", static_cast<int64_t>(idx[e]),
                  " is outside ", nm.tensors, "[", bl.tensor, "], which has ", numel,
                  " elements; the indices of segment ", bl.tensor, " must lie in [0, ", numel, ")");
  }
}

template <typename index_t, typename T, typename F>
void gather_one(const T* src, const index_t* idx, F* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<F>(src[idx[j]]);
}

template <typename index_t, typename T, typename F>
void scatter_one(T* dst, const index_t* idx, const F* values, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[idx[j]] = static_cast<T>(values[j]);
}

// Base pointer of a dense tensor's memory block (its lowest address: strides are positive).
template <typename T>
T* base_ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

}  // namespace

void gather_masked(at::TensorList srcs, const at::Tensor& index, at::IntArrayRef begins, at::IntArrayRef ends,
                   const at::Tensor& out) {
  const Names nm{"gather_masked", "srcs", "out", false};
  check_args(nm, srcs, index, begins, ends, out);
  const auto blocks = make_blocks(begins, ends);
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_masked", [&] {
    const index_t* idx = index.data_ptr<index_t>();
    std::vector<char> bad(blocks.size(), 0);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gather_masked_out", [&] {
      using F = scalar_t;
      F* dst = out.data_ptr<F>();
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const Block& bl = blocks[b];
          const at::Tensor& src = srcs[bl.tensor];
          // checked block by block, just before its copy reads the same indices (from cache then):
          // a bad index leaves only `out` partly written, as torch's out= ops do
          if (any_outside(idx + bl.begin, bl.end - bl.begin, src.numel())) {
            bad[b] = 1;
            continue;
          }
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_masked_src", [&] {
            gather_one(base_ptr<scalar_t>(src), idx + bl.begin, dst + bl.begin, bl.end - bl.begin);
          });
        }
      });
    });
    raise_first_outside(nm, srcs, idx, blocks, bad);
  });
}

void scatter_masked_(at::TensorList dsts, const at::Tensor& index, at::IntArrayRef begins, at::IntArrayRef ends,
                     const at::Tensor& values) {
  const Names nm{"scatter_masked_", "dsts", "values", true};
  check_args(nm, dsts, index, begins, ends, values);
  const auto blocks = make_blocks(begins, ends);
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "scatter_masked_", [&] {
    const index_t* idx = index.data_ptr<index_t>();
    // every index checked before anything is written: a bad call leaves the tensors unchanged
    std::vector<char> bad(blocks.size(), 0);
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        bad[b] = any_outside(idx + blocks[b].begin, blocks[b].end - blocks[b].begin, dsts[blocks[b].tensor].numel());
    });
    raise_first_outside(nm, dsts, idx, blocks, bad);
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "scatter_masked_values", [&] {
      using F = scalar_t;
      const F* src = values.data_ptr<F>();
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const Block& bl = blocks[b];
          const at::Tensor& dst = dsts[bl.tensor];
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "scatter_masked_dst", [&] {
            scatter_one(base_ptr<scalar_t>(dst), idx + bl.begin, src + bl.begin, bl.end - bl.begin);
          });
        }
      });
    });
  });
}

// The ops are declared in Python (fishkern/ops/masked_copy.py, with their fakes and the plain-PyTorch
// default kernels); this adds the CPU kernels.
TORCH_LIBRARY_IMPL(fishkern, CPU, m) {
  m.impl("gather_masked", &gather_masked);
  m.impl("scatter_masked_", &scatter_masked_);
}

}  // namespace fishkern
