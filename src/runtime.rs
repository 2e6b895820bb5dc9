//! Process-wide settings made once at start-up, before any work.

/// Keeps freed memory in the process instead of handing it back to the kernel at every free.
///
/// libtorch allocates and frees every large activation once per operation. With glibc's default
/// settings each of those blocks is its own `mmap`, unmapped again on free, so every batch
/// page-faults and zeroes hundreds of megabytes anew and the kernel's time exceeds the
/// program's (measured: infer 2.7x slower, fit 2x). Serving them from the heap, and not trimming
/// it, reuses the same pages. Memory stays bounded by the largest working set (one batch), which
/// is what the process holds at its peak anyway. Returns false where the C library refused.
pub fn tune_allocator() -> bool {
    // SAFETY: mallopt only changes malloc's parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}
