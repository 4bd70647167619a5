import Foundation
import Logging

/// Process-wide structured logging to stderr (journald picks it up under systemd).
public enum Logging {
    public static func make(label: String, level: String) -> Logger {
        var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = Logger.Level(rawValue: level.lowercased()) ?? .info
        return logger
    }
}
