// Parameter tables: the per-step host checks of the masked optimizers in one C++ loop.
//
// A masked optimizer steps hundreds of tensors with one kernel launch that reads their addresses
// from a device-side table. Every step it must make sure that table is still right (a parameter's
// storage can be swapped by `p.data = ...`, a gradient reallocated by autograd) and find out where
// the gradients are (gathered by the optimizer's hooks, with `.grad` holding its proxy, or dense
// `.grad` tensors). Done in Python that is ~100 ns per tensor and per question; here it is a few
// ns per tensor (one pass, each TensorImpl read once), so a step's host cost stays nearly flat in the
// number of tensors.
//
//   param_table_new(params, checked)  -> handle   register the tensors once (kept alive here)
//   param_table_set_proxies(h, proxies)           the `.grad` objects the hooks install
//   param_table_check(h, mode, out, commit) -> flags  one pass over the checked tensors (below)
//   param_table_commit(h, mode)                   a step of every checked tensor is under way: bump
//                                                 their versions, mode 0: drop their proxies
//   param_table_clear_grads(h)                    `.grad = None` where `.grad` is the proxy
//   param_table_bump(h, first, last)              autograd version bump after a raw-pointer write
//   param_table_free(h)
//
// `checked` are the positions the optimizer trains (k > 0). The flags say what the Python side must
// look at (it then takes its general, per-tensor path, which explains and handles each case).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fishkern {
namespace {

// flags returned by param_table_check
constexpr int64_t kParamMoved = 1;     // a parameter's data pointer differs from the last check
constexpr int64_t kGradMoved = 2;      // mode 1: a gradient's data pointer differs from the last check
constexpr int64_t kGradMissing = 4;    // a checked tensor has no .grad
constexpr int64_t kGradOther = 8;      // mode 0: .grad is not the proxy; mode 1: .grad not laid out like its parameter
constexpr int64_t kParamChanged = 16;  // a parameter's dtype or device changed

struct Table {
  std::vector<at::Tensor> params;
  std::vector<int64_t> checked;
  std::vector<at::Tensor> proxies;  // per position; undefined where none
  std::vector<int64_t> param_addr;  // as of the last check
  std::vector<int64_t> grad_addr;
  std::vector<at::ScalarType> dtypes;
  std::vector<at::Device> devices;
};

std::mutex registry_mutex;
std::unordered_map<int64_t, std::shared_ptr<Table>> registry;
int64_t next_handle = 1;

std::shared_ptr<Table> get(int64_t h) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(h);
  TORCH_CHECK(it != registry.end(), "fishkern param table ", h, " does not exist (freed, or never created)");
  return it->second;
}

int64_t param_table_new(at::TensorList params, at::IntArrayRef checked) {
  auto t = std::make_shared<Table>();
  const int64_t n = static_cast<int64_t>(params.size());
  for (const auto& p : params) {
    TORCH_CHECK(p.defined(), "param_table_new: undefined tensor");
    t->params.push_back(p);
    t->dtypes.push_back(p.scalar_type());
    t->devices.push_back(p.device());
    t->param_addr.push_back(reinterpret_cast<int64_t>(p.data_ptr()));
  }
  for (int64_t i : checked) {
    TORCH_CHECK(0 <= i && i < n, "param_table_new: checked position ", i, " outside [0, ", n, ")");
    t->checked.push_back(i);
  }
  t->proxies.resize(n);
  t->grad_addr.assign(n, 0);
  std::lock_guard<std::mutex> lock(registry_mutex);
  const int64_t h = next_handle++;
  registry.emplace(h, std::move(t));
  return h;
}

void param_table_free(int64_t h) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(h);
}

void param_table_set_proxies(int64_t h, at::IntArrayRef positions, at::TensorList proxies) {
  auto t = get(h);
  TORCH_CHECK(positions.size() == proxies.size(), "param_table_set_proxies: ", positions.size(), " positions but ",
              proxies.size(), " proxies");
  for (size_t j = 0; j < positions.size(); ++j) {
    const int64_t i = positions[j];
    TORCH_CHECK(0 <= i && i < static_cast<int64_t>(t->params.size()), "param_table_set_proxies: position ", i,
                " out of range");
    t->proxies[i] = proxies[j];
  }
}

// mode 0: the gradients should be the registered proxies (gathered by the hooks).
// mode 1: the gradients should be dense tensors laid out like their parameters (read in place);
//         their addresses are recorded.
// When a parameter or gradient address changed, `out` (int64, CPU, 2 * n entries) receives every
// parameter address in [0, n) and every gradient address in [n, 2n) (0 where none).
// `commit`: when nothing needs the slow path, also do what param_table_commit does, in the same
// pass over the tensors' metadata (undone never: the caller is committed to stepping them all).
void commit_one(at::Tensor& p, const at::Tensor& proxy, int64_t mode) {
  c10::TensorImpl* impl = p.unsafeGetTensorImpl();
  impl->bump_version();
  if (mode == 0 && proxy.defined() && impl->grad().unsafeGetTensorImpl() == proxy.unsafeGetTensorImpl())
    impl->mutable_grad().reset();
}

// The address a kernel reads for `impl` (its data_ptr()), from fields TensorImpl keeps inline: this
// avoids data_ptr()'s out-of-line storage checks, a few ns per tensor that add up over hundreds of
// tensors. 0 for a tensor without storage (never a valid address: the caller then sees it as moved).
inline int64_t address_of(const c10::TensorImpl* impl) {
  const c10::Storage& st = impl->unsafe_storage();
  if (!st) return 0;
  const auto* base = static_cast<const char*>(st.unsafeGetStorageImpl()->data_ptr().get());
  return reinterpret_cast<int64_t>(base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize()));
}

int64_t param_table_check(int64_t h, int64_t mode, at::Tensor out, bool commit) {
  auto t = get(h);
  const int64_t n = static_cast<int64_t>(t->params.size());
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.is_contiguous() && out.numel() == 2 * n,
              "param_table_check: out must be a contiguous CPU int64 tensor of ", 2 * n, " entries");
  // One pass over the checked tensors, touching each TensorImpl once (after a backward pass these
  // are cold in the caches: the next tensors' TensorImpls are prefetched while one is checked).
  // Untrained tensors (k = 0) are never launched, so where their storage lies does not matter.
  int64_t flags = 0;
  const int64_t* checked = t->checked.data();
  const int64_t nc = static_cast<int64_t>(t->checked.size());
  constexpr int64_t kAhead = 4;
  for (int64_t j = 0; j < std::min(kAhead, nc); ++j) __builtin_prefetch(t->params[checked[j]].unsafeGetTensorImpl());
  for (int64_t j = 0; j < nc; ++j) {
    if (j + kAhead < nc) __builtin_prefetch(t->params[checked[j + kAhead]].unsafeGetTensorImpl());
    const int64_t i = checked[j];
    const c10::TensorImpl* p = t->params[i].unsafeGetTensorImpl();
    const int64_t a = address_of(p);
    if (a != t->param_addr[i] || a == 0) {
      t->param_addr[i] = a;
      flags |= kParamMoved;  // the Python side then checks its shape and strides
    }
    if (c10::typeMetaToScalarType(p->dtype()) != t->dtypes[i] || p->device() != t->devices[i]) flags |= kParamChanged;
    // TensorImpl::grad(), not Tensor::grad(): the latter asks autograd whether p is a leaf first
    const at::Tensor& g = p->grad();
    if (!g.defined()) {
      flags |= kGradMissing;
      continue;
    }
    const c10::TensorImpl* gi = g.unsafeGetTensorImpl();
    if (mode == 0) {
      if (!t->proxies[i].defined() || gi != t->proxies[i].unsafeGetTensorImpl()) flags |= kGradOther;
      continue;
    }
    // a Python tensor subclass (another optimizer's MaskedGrad, sparse backward's) has no memory of
    // its own to read: the Python side handles it
    if (gi->key_set().has(c10::DispatchKey::Python) || gi->layout() != c10::kStrided ||
        c10::typeMetaToScalarType(gi->dtype()) != t->dtypes[i] || gi->device() != t->devices[i] || gi->strides() != p->strides() ||
        gi->sizes() != p->sizes()) {
      flags |= kGradOther;
      continue;
    }
    const int64_t ga = address_of(gi);
    if (ga != t->grad_addr[i]) {
      t->grad_addr[i] = ga;
      flags |= kGradMoved;
    }
  }
  if (flags & (kParamMoved | kGradMoved)) {
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      o[i] = t->param_addr[i];
      o[n + i] = t->grad_addr[i];
    }
  }
  constexpr int64_t kSlowPath = kParamMoved | kGradMissing | kGradOther | kParamChanged;
  if (commit && !(flags & kSlowPath)) {
    for (int64_t i : t->checked) commit_one(t->params[i], t->proxies[i], mode);
  }
  return flags;
}

// Every checked tensor is being stepped (the steady state): bump their autograd versions (the
// kernels write them through raw pointers) and, mode 0, drop the proxies from .grad (the gathered
// gradients are consumed), in one pass.
void param_table_commit(int64_t h, int64_t mode) {
  auto t = get(h);
  for (int64_t i : t->checked) commit_one(t->params[i], t->proxies[i], mode);
}

// After step(): gradients gathered by the hooks are consumed; drop the proxies from .grad.
void param_table_clear_grads(int64_t h) {
  auto t = get(h);
  for (int64_t i : t->checked) {
    auto& p = t->params[i];
    c10::TensorImpl* impl = p.unsafeGetTensorImpl();
    const at::Tensor& g = impl->grad();
    if (g.defined() && t->proxies[i].defined() && g.unsafeGetTensorImpl() == t->proxies[i].unsafeGetTensorImpl())
      impl->mutable_grad().reset();
  }
}

// A kernel wrote parameters [first, last] through raw pointers: bump their autograd versions, as
// an in-place torch op would, so that a graph which saved their old values raises on backward.
void param_table_bump(int64_t h, int64_t first, int64_t last) {
  auto t = get(h);
  for (int64_t i = std::max<int64_t>(first, 0); i <= last && i < static_cast<int64_t>(t->params.size()); ++i)
    t->params[i].unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fishkern, m) {
  m.def("param_table_new(Tensor[] params, int[] checked) -> int", &param_table_new);
  m.def("param_table_free(int handle) -> ()", &param_table_free);
  m.def("param_table_set_proxies(int handle, int[] positions, Tensor[] proxies) -> ()", &param_table_set_proxies);
  m.def("param_table_check(int handle, int mode, Tensor(a!) out, bool commit=False) -> int", &param_table_check);
  m.def("param_table_commit(int handle, int mode) -> ()", &param_table_commit);
  m.def("param_table_clear_grads(int handle) -> ()", &param_table_clear_grads);
  m.def("param_table_bump(int handle, int first, int last) -> ()", &param_table_bump);
}

}  // namespace fishkern
