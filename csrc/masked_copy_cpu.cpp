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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

void check_args(const char* op, at::TensorList tensors, const at::Tensor& index, at::IntArrayRef begins,
                at::IntArrayRef ends, const at::Tensor& flat) {
  TORCH_CHECK(begins.size() == tensors.size() && ends.size() == tensors.size(), op,
              ": begins and ends must have one entry per tensor");
  TORCH_CHECK(index.dim() == 1 && (index.scalar_type() == at::kInt || index.scalar_type() == at::kLong) &&
                  index.is_contiguous() && index.device().is_cpu(),
              op, ": index must be a contiguous 1-D int32/int64 CPU tensor");
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous() && flat.device().is_cpu() &&
                  (flat.scalar_type() == at::kFloat || flat.scalar_type() == at::kDouble),
              op, ": the flat buffer must be a contiguous 1-D float32/float64 CPU tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(0 <= begins[i] && begins[i] <= ends[i] && ends[i] <= index.numel() && ends[i] <= flat.numel(), op,
                ": segment ", i, " [", begins[i], ", ", ends[i], ") is outside the index / flat buffers");
    TORCH_CHECK(tensors[i].device().is_cpu() && tensors[i].is_non_overlapping_and_dense(), op, ": tensor ", i,
                " must be a dense CPU tensor");
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
  check_args("gather_masked", srcs, index, begins, ends, out);
  const auto blocks = make_blocks(begins, ends);
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_masked", [&] {
    const index_t* idx = index.data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gather_masked_out", [&] {
      using F = scalar_t;
      F* dst = out.data_ptr<F>();
      at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const Block& bl = blocks[b];
          const at::Tensor& src = srcs[bl.tensor];
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_masked_src", [&] {
            gather_one(base_ptr<scalar_t>(src), idx + bl.begin, dst + bl.begin, bl.end - bl.begin);
          });
        }
      });
    });
  });
}

void scatter_masked_(at::TensorList dsts, const at::Tensor& index, at::IntArrayRef begins, at::IntArrayRef ends,
                     const at::Tensor& values) {
  check_args("scatter_masked_", dsts, index, begins, ends, values);
  const auto blocks = make_blocks(begins, ends);
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "scatter_masked_", [&] {
    const index_t* idx = index.data_ptr<index_t>();
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

TORCH_LIBRARY_IMPL(fishkern, CPU, m) {
  m.impl("gather_masked", &gather_masked);
  m.impl("scatter_masked_", &scatter_masked_);
}

}  // namespace fishkern
