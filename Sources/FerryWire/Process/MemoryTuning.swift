import CFerrySystem

/// Process-wide allocator settings for the daemons, which move megabyte buffers (NBD payloads,
/// replication frames) at gigabytes per second.
public enum MemoryTuning {
    /// By default glibc serves such buffers with fresh mmaps and gives freed heap back to the
    /// kernel at once, so every buffer is page-faulted and zeroed again: profiles showed a
    /// tenth of the agent's time in clear_page. Keeping them in the heap reuses warm pages;
    /// `keepFreedBytes` bounds what freed heap stays resident after a burst.
    ///
    /// The agent runs beside the workload with a memory budget (its change log's): it keeps
    /// 4 MiB, so resident memory follows what is live. The controller, on its own machine,
    /// keeps 256 MiB warm: every replication frame is a fresh megabyte buffer. (Capping the
    /// agent's arenas at two lowers its peak by ~10 MiB but halves its throughput: the NBD and
    /// event-loop threads then contend for malloc's locks.)
    public static func forBulkIO(keepFreedBytes: Int32) {
        ferry_malloc_for_bulk_io(keepFreedBytes)
    }
}
