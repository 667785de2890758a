#include "memory.h"

#include <sys/mman.h>

#include <cstdint>

namespace fastft {

at::Tensor empty_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  constexpr uintptr_t kHuge = 1 << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory only
  return out;
}

}  // namespace fastft
