import Foundation

/// A JSON value, decoded without losing whether a number was a boolean.
indirect enum JSONValue: Decodable, Sendable, CustomStringConvertible {
    case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    static func parse(_ data: Data) throws -> JSONValue { try JSONDecoder().decode(JSONValue.self, from: data) }

    subscript(key: String) -> JSONValue? { if case .object(let o) = self { o[key] } else { nil } }
    var object: [String: JSONValue]? { if case .object(let o) = self { o } else { nil } }
    var array: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    var string: String? { if case .string(let s) = self { s } else { nil } }

    var description: String {
        switch self {
        case .null: "null"
        case .bool(let b): "\(b)"
        case .number(let n): "\(n)"
        case .string(let s): "\"\(s.prefix(60))\""
        case .array(let a): "[\(a.count) items]"
        case .object(let o): "{\(o.keys.sorted().prefix(8).joined(separator: ","))}"
        }
    }
}

/// Checks a JSON value against a schema of an OpenAPI 3.1 document: `$ref`, `type` (also a
/// list with "null"), `enum`, `required`, `properties` with `additionalProperties: false`
/// (no undocumented field passes), a map's `additionalProperties` schema, `items`,
/// `minimum`/`maximum`, and `format: date-time`. Enough to keep the document true to what
/// the server sends.
struct JSONSchemaCheck {
    let document: JSONValue

    func errors(_ value: JSONValue, schema: JSONValue, at path: String = "$") -> [String] {
        var schema = schema
        var hops = 0
        while let ref = schema["$ref"]?.string {
            guard ref.hasPrefix("#/"), hops < 16 else { return ["\(path): unresolvable $ref \(ref)"] }
            var target: JSONValue? = document
            for part in ref.dropFirst(2).split(separator: "/") { target = target?[String(part)] }
            guard let resolved = target else { return ["\(path): $ref \(ref) names nothing"] }
            schema = resolved
            hops += 1
        }
        var found: [String] = []
        if let allowed = schema["enum"]?.array {
            let text = value.string.map { "\"\($0)\"" } ?? value.description
            if !allowed.contains(where: { $0.string == value.string && $0.string != nil }) {
                found.append("\(path): \(text) is not one of \(allowed.compactMap(\.string))")
            }
        }
        let types: [String] = schema["type"]?.string.map { [$0] } ?? schema["type"]?.array?.compactMap(\.string) ?? []
        if !types.isEmpty, !types.contains(where: { matches(value, $0) }) {
            return found + ["\(path): \(value) is not of type \(types.joined(separator: "|"))"]
        }
        switch value {
        case .number(let n):
            if case .number(let min)? = schema["minimum"], n < min { found.append("\(path): \(n) < minimum \(min)") }
            if case .number(let max)? = schema["maximum"], n > max { found.append("\(path): \(n) > maximum \(max)") }
        case .string(let s):
            if schema["format"]?.string == "date-time", ISO8601DateFormatter().date(from: s) == nil {
                found.append("\(path): '\(s)' is not an RFC 3339 date-time")
            }
        case .array(let items):
            if let itemSchema = schema["items"] {
                for (i, item) in items.enumerated() { found += errors(item, schema: itemSchema, at: "\(path)[\(i)]") }
            }
        case .object(let fields):
            for key in schema["required"]?.array?.compactMap(\.string) ?? [] where fields[key] == nil {
                found.append("\(path): required field '\(key)' is missing")
            }
            let properties = schema["properties"]?.object ?? [:]
            for (key, field) in fields {
                if let fieldSchema = properties[key] {
                    found += errors(field, schema: fieldSchema, at: "\(path).\(key)")
                } else if case .bool(false)? = schema["additionalProperties"] {
                    found.append("\(path): field '\(key)' is not in the document")
                } else if let extra = schema["additionalProperties"], extra.object != nil {
                    found += errors(field, schema: extra, at: "\(path).\(key)")
                }
            }
        default:
            break
        }
        return found
    }

    private func matches(_ value: JSONValue, _ type: String) -> Bool {
        switch (value, type) {
        case (.null, "null"), (.bool, "boolean"), (.string, "string"), (.array, "array"), (.object, "object"), (.number, "number"): true
        case (.number(let n), "integer"): n.rounded() == n
        default: false
        }
    }
}
