import Foundation

/// How ferryctl shows times and sizes: compact, in the local time zone, locale-independent so
/// scripts scraping the text see the same format everywhere.
public enum Format {
    /// A span as its largest unit, rounded down: `45s`, `12m`, `3h`, `29d`.
    public static func span(_ seconds: TimeInterval) -> String {
        let s = Int(max(0, seconds))
        switch s {
        case ..<60: return "\(s)s"
        case ..<3600: return "\(s / 60)m"
        case ..<86_400: return "\(s / 3600)h"
        default: return "\(s / 86_400)d"
        }
    }

    /// `3s ago` or `in 29d`.
    public static func relative(_ date: Date, now: Date = Date()) -> String {
        let delta = date.timeIntervalSince(now)
        // Up to a second of clock skew between controller and operator reads as "now", not "in 0s".
        if delta > 1 { return "in \(span(delta))" }
        return "\(span(-delta)) ago"
    }

    /// `2026-12-25`, local time.
    public static func day(_ date: Date) -> String {
        let c = Calendar.current.dateComponents([.year, .month, .day], from: date)
        return String(format: "%04d-%02d-%02d", c.year ?? 0, c.month ?? 0, c.day ?? 0)
    }

    /// `2026-12-25 14:03:09`, local time.
    public static func timestamp(_ date: Date) -> String {
        let c = Calendar.current.dateComponents([.hour, .minute, .second], from: date)
        return day(date) + String(format: " %02d:%02d:%02d", c.hour ?? 0, c.minute ?? 0, c.second ?? 0)
    }

    /// A certificate or token expiry: `2026-12-25 (in 29d)` or `2026-01-02 (expired)`.
    public static func expiry(_ date: Date?, now: Date = Date()) -> String {
        guard let date else { return "-" }
        return day(date) + (date > now ? " (in \(span(date.timeIntervalSince(now))))" : " (expired)")
    }

    /// A time with how long ago it was: `2026-12-25 14:03:09 (3m ago)`, or `-` if never.
    public static func moment(_ date: Date?, now: Date = Date()) -> String {
        guard let date else { return "-" }
        return "\(timestamp(date)) (\(relative(date, now: now)))"
    }

    /// Binary units: `512 B`, `4.0 KiB`, `15.6 GiB`.
    public static func bytes(_ count: UInt64) -> String {
        let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        guard count >= 1024 else { return "\(count) B" }
        var value = Double(count) / 1024
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return String(format: "%.1f", value) + " " + units[unit]
    }
}
