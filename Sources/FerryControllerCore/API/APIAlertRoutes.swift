import FerryWire
import Foundation
import Hummingbird

/// Alerts: what fires now, and what fired and was resolved.
extension APIRoutes {
    func addAlertRoutes(_ v1: RouterGroup<APIContext>) {
        v1.get("alerts") { request, context in
            _ = try context.require(.viewer)
            let all = request.uri.queryParameters.get("all") == "true"
            return JSONBody(value: try await wrap { try await store.alerts(all: all) })
        }
        v1.get("alerts/:id") { _, context in
            _ = try context.require(.viewer)
            let id = try context.parameters.require("id")
            guard let alert = try await wrap({ try await store.alert(id: id) }) else {
                throw APIError(error: FerryError(.notFound, "no alert '\(id.prefix(64))'; 'ferryctl alerts --all' lists them"))
            }
            return JSONBody(value: alert)
        }
    }

    /// What the alert rules look at: the API's own views.
    func alertSnapshot() async throws -> AlertSnapshot {
        AlertSnapshot(now: Date(), hosts: try await hostViews(), volumes: try await volumeViews(), groups: try await groupViews(),
                      plans: try await store.plans(), jobs: try await jobs.list())
    }
}
