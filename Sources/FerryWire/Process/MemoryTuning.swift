import CFerrySystem

/// Process-wide allocator settings for the daemons, which move megabyte buffers (NBD payloads,
/// replication frames) at gigabytes per second.
public enum MemoryTuning {
    /// By default glibc serves such buffers with fresh mmaps and gives freed heap back to the
    /// kernel at once, so every buffer is page-faulted and zeroed again: profiles showed a
    /// tenth of the agent's time in clear_page. Keeping them in the heap reuses warm pages.
    /// The cost is resident memory up to the trim threshold after a burst.
    public static func forBulkIO() {
        ferry_malloc_for_bulk_io()
    }
}
