import FerryWire
import Foundation
import Yams

/// The OpenAPI 3.1 document of the operator API (API/openapi.yaml, compiled in), served at
/// `/v1/openapi.yaml` and, converted once, at `/v1/openapi.json`.
enum OpenAPIDocument {
    static var yaml: String { EmbeddedAssets.files["openapi.yaml"]?.text ?? "" }

    /// The JSON form, with sorted keys; empty if the YAML does not parse (a test catches that).
    static let json: Data = {
        guard let object = try? Yams.load(yaml: yaml), JSONSerialization.isValidJSONObject(object),
              let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        else { return Data() }
        return data
    }()

    /// Every documented operation as "METHOD /path/{param}".
    static func operations() throws -> Set<String> {
        guard let object = try Yams.load(yaml: yaml) as? [String: Any], let paths = object["paths"] as? [String: Any] else {
            throw FerryError(.internalError, "openapi.yaml has no paths")
        }
        var found: Set<String> = []
        for (path, item) in paths {
            guard let item = item as? [String: Any] else { continue }
            for method in ["get", "put", "post", "delete", "patch", "head"] where item[method] != nil {
                found.insert("\(method.uppercased()) \(path)")
            }
        }
        return found
    }
}
