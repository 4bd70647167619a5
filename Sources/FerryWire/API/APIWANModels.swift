import Foundation

extension API {
    /// How agents compress the written bytes they stream.
    public enum StreamCompression: String, Codable, Sendable, CaseIterable {
        case none
        case lz4
    }

    /// One scope's WAN settings: all hosts together, or one host. Nil fields are unset (no
    /// limit; compression as for all hosts, or none).
    public struct WANRule: Codable, Sendable, Equatable {
        /// Bytes per second of replication data into the controller and of reverse streams out
        /// of it (for all hosts: their sum).
        public var limitBytesPerSecond: UInt64?
        public var compression: StreamCompression?
        public init(limitBytesPerSecond: UInt64? = nil, compression: StreamCompression? = nil) {
            self.limitBytesPerSecond = limitBytesPerSecond
            self.compression = compression
        }
    }

    public struct WANHostRule: Codable, Sendable, Equatable {
        public var host: String
        public var rule: WANRule
        public init(host: String, rule: WANRule) {
            self.host = host
            self.rule = rule
        }
    }

    /// `GET /v1/wan`.
    public struct WANSettings: Codable, Sendable, Equatable {
        public var all: WANRule
        public var hosts: [WANHostRule]
        public init(all: WANRule, hosts: [WANHostRule]) {
            self.all = all
            self.hosts = hosts
        }
    }

    /// `PUT /v1/wan`: changes one scope (a host, or all hosts without `host`). A field left out
    /// keeps its value; `limitBytesPerSecond` 0 removes the limit; `compression` "inherit"
    /// (for a host) returns it to what all hosts have.
    public struct WANUpdate: Codable, Sendable {
        public var host: String?
        public var limitBytesPerSecond: UInt64?
        public var compression: String?
        public init(host: String? = nil, limitBytesPerSecond: UInt64? = nil, compression: String? = nil) {
            self.host = host
            self.limitBytesPerSecond = limitBytesPerSecond
            self.compression = compression
        }
    }
}
