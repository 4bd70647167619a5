import FerryWire
import Foundation
import Hummingbird

/// WAN mode: bandwidth limits and stream compression, per host and for all hosts.
extension APIRoutes {
    func addWANRoutes(_ v1: RouterGroup<APIContext>) {
        v1.get("wan") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await wrap { try await agents.wanSettings() })
        }
        v1.put("wan") { request, context in
            let who = try context.require(.operator)
            let body = try await request.decode(as: API.WANUpdate.self, context: context)
            return JSONBody(value: try await wrap { try await agents.updateWAN(body, actor: who.actor) })
        }
    }
}
