// Large output tensors backed by 2 MiB transparent huge pages.
//
// An output as large as the logits, written once (the logits gradient), is paid for mostly in its
// first touch when it sits on fresh 4 KiB pages: a page fault and a kernel zero-fill per page,
// 70 ms for a 250 MiB gradient here, more than the kernel itself. Huge pages cut the faults
// 512-fold. Below 8 MiB the allocator's reuse of freed memory wins (measured on GAE's 4 MiB
// outputs: a fresh huge-page mapping per call was twice as slow), so those tensors, and any
// mmap failure, go to ATen's allocator.
#pragma once

#include <ATen/ATen.h>

#include <sys/mman.h>

#include <cstdint>

namespace fastalign {

inline at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  const auto contiguous = options.memory_format(at::MemoryFormat::Contiguous);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < 4 * kHuge) return at::empty(sizes, contiguous);
  // One huge page of slack, so the tensor can start on a 2 MiB boundary; untouched, it costs no memory.
  const size_t mapped = bytes + kHuge;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::empty(sizes, contiguous);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  return at::from_blob(
      reinterpret_cast<void*>(aligned), sizes, [base, mapped](void*) { munmap(base, mapped); }, contiguous);
}

}  // namespace fastalign
