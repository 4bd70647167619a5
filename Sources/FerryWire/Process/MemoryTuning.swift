import CFerrySystem

/// Process-wide allocator settings for the daemons, which move megabyte buffers (NBD payloads,
/// replication frames) at gigabytes per second.
public enum MemoryTuning {
    /// By default glibc serves such buffers with fresh mmaps and gives freed heap back to the
    /// kernel at once, so every buffer is page-faulted and zeroed again: profiles showed a
    /// tenth of the agent's time in clear_page. Keeping them in the heap reuses warm pages.
    /// Freed heap past a small threshold still goes back, so resident memory follows what is
    /// live: the change log's budget, not the largest burst so far.
    public static func forBulkIO() {
        ferry_malloc_for_bulk_io()
    }
}
