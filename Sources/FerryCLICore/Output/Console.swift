import FerryWire
import Foundation

/// Where ferryctl writes: data to stdout, hints and errors to stderr, so
/// `TOKEN=$(ferryctl token create)` and `ferryctl hosts --json | jq` see only data.
enum Console {
    /// Prints `value` as the API encodes it (pretty, sorted keys, ISO 8601 dates).
    static func json<T: Encodable>(_ value: T) throws {
        let data = try API.encoder().encode(value)
        print(String(decoding: data, as: UTF8.self))
    }

    /// Writes one line to stderr.
    static func note(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}
