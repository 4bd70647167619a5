/// A plain-text table: left-aligned columns separated by two spaces, headers in capitals, no
/// trailing spaces (so output diffs and greps cleanly).
public struct TextTable: Sendable {
    /// Column headers, printed upper-cased.
    public let headers: [String]
    /// Rows added so far; each has exactly `headers.count` cells.
    public private(set) var rows: [[String]] = []

    public init(_ headers: [String]) {
        self.headers = headers.map { $0.uppercased() }
    }

    public init(_ headers: String...) {
        self.init(headers)
    }

    /// Adds a row; missing cells are blank, extra cells are dropped, empty cells print as `-`
    /// so columns stay countable with `awk`.
    public mutating func add(_ cells: [String]) {
        var row = cells.prefix(headers.count).map { Text.printable($0) }
        row += Array(repeating: "", count: headers.count - row.count)
        rows.append(row.map { $0.isEmpty ? "-" : $0 })
    }

    /// Adds a row.
    public mutating func add(_ cells: String...) {
        add(cells)
    }

    /// The table as lines joined by newlines, without a final newline.
    public func render() -> String {
        var widths = headers.map(\.count)
        for row in rows {
            for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) }
        }
        return ([headers] + rows).map { row in
            var line = ""
            for (i, cell) in row.enumerated() {
                if i == row.count - 1 {
                    line += cell
                } else {
                    line += cell + String(repeating: " ", count: widths[i] - cell.count + 2)
                }
            }
            while line.hasSuffix(" ") { line.removeLast() }
            return line
        }.joined(separator: "\n")
    }
}

/// Aligned `key: value` lines, for one record.
public struct KeyValueList: Sendable {
    public private(set) var pairs: [(key: String, value: String)] = []

    public init() {}

    /// Adds a line; an empty value prints as `-`.
    public mutating func add(_ key: String, _ value: String) {
        let value = Text.printable(value)
        pairs.append((key, value.isEmpty ? "-" : value))
    }

    /// Adds an empty line between groups of fields; alignment stays shared.
    public mutating func addBreak() {
        pairs.append(("", ""))
    }

    /// The lines joined by newlines, values aligned one column after the longest key.
    public func render() -> String {
        let width = (pairs.map(\.key.count).max() ?? 0) + 1
        return pairs.map { pair in
            if pair.key.isEmpty { return "" }
            let label = pair.key + ":"
            return label + String(repeating: " ", count: width - pair.key.count + 1) + pair.value
        }.joined(separator: "\n")
    }
}

enum Text {
    /// Control characters from the server (host names, audit details, inventory strings) are
    /// shown escaped, so they cannot break table layout or drive the terminal.
    static func printable(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\n", "\r", "\t": out += " "
            case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value):
                out += "\\u{\(String(scalar.value, radix: 16))}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}
