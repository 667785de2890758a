// Output allocation shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

namespace fastft {

// at::empty whose large, not yet touched pages are marked for transparent huge pages: a freshly mmapped output
// otherwise costs one page fault per 4 KiB, several times a memory-bound kernel that writes it.
at::Tensor empty_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace fastft
