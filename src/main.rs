fn main() -> std::process::ExitCode {
    keep_big_allocations_out_of_the_heap();
    flowgate::cli::main()
}

/// Each login hashes with argon2id, which takes 19 MiB for a moment. glibc
/// serves such blocks from `mmap` and gives them back on free, but only
/// until the first one is freed: then it raises its threshold and keeps
/// later ones in the heap, so an idle flowgate would hold 20 MiB it no longer
/// uses. A fixed threshold keeps big blocks out of the heap for good.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_big_allocations_out_of_the_heap() {
    // SAFETY: mallopt only changes allocator tuning; it is called first
    // thing in main, before any other thread exists, and M_MMAP_THRESHOLD
    // with a value below the 32 MiB maximum is always accepted.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_big_allocations_out_of_the_heap() {}
