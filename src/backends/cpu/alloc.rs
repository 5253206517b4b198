//! Fresh gradient-sized buffers on the CPU.
//!
//! A new \[B, C\] gradient costs more in page faults than in arithmetic: the first write to each
//! 4 KiB page of a fresh allocation traps into the kernel, which zeroes the page. On the 2-vCPU
//! machine of benches/RESULTS.md the first write of 125 MiB took ~110 ms with 4 KiB pages and
//! ~19 ms once the range was advised for transparent huge pages (2 MiB: 512× fewer faults), against
//! ~7 ms for a second write. So on Linux a large buffer is allocated zeroed (`calloc`: untouched
//! pages) and advised `MADV_HUGEPAGE` before anything writes it. The advice is a hint: where
//! transparent huge pages are disabled it changes nothing, and the results never depend on it.
//! (Where THP is `always`, the kernel does this by itself; `madvise` mode, the common default,
//! needs the hint.) Callers that step in a loop avoid the allocation entirely with
//! `loss_and_grad_into`.

use crate::math::Element;

/// Below this size the faults cost little and a huge page would mostly be wasted.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// `n` zeros of `T`, from zeroed (untouched) memory, advised for huge pages when large.
pub(crate) fn zeroed_buffer<T: Element>(n: usize) -> Vec<T> {
    let v = T::zeroed_vec(n);
    advise_huge_pages(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &[T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = v.as_ptr() as usize;
    let first = start.next_multiple_of(HUGE);
    let end = (start + bytes) / HUGE * HUGE;
    if end > first {
        // SAFETY: [first, end) lies inside the live allocation `v` and is page-aligned; the
        // advice changes only how the kernel backs the pages, never their contents or validity.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_: &[T]) {}
