import FerryWire
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// Recovery plans and the jobs that run operations on them.
extension APIRoutes {
    /// Largest plan file accepted.
    static let maxPlanBytes = 256 << 10

    func addPlanRoutes(_ v1: RouterGroup<APIContext>) {
        v1.post("plans") { request, context in
            let who = try context.require(.operator)
            let body = try await request.decode(as: API.PlanApplyRequest.self, context: context)
            guard body.text.utf8.count <= Self.maxPlanBytes else {
                throw APIError(error: FerryError(.badRequest, "a plan file is at most \(Self.maxPlanBytes) bytes"))
            }
            let file = body.file.isEmpty ? "plan.yaml" : String(body.file.suffix(200))
            let view = try await wrap {
                // (The parser ignores volumes taken by the plan it parses: re-applying works.)
                let plan = try PlanParser.parse(body.text, file: file, known: try await store.planKnowledge())
                return try await store.applyPlan(plan, source: body.text, actor: who.actor)
            }
            return JSONBody(value: view, status: .created)
        }
        v1.get("plans") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await wrap { try await store.plans() })
        }
        v1.get("plans/:name") { _, context in
            _ = try context.require(.viewer)
            let name = try context.parameters.require("name")
            var view = try await wrap { try await store.plan(named: name) }
            let hydration = await hydrations.list(plan: name)
            view.hydration = hydration.isEmpty ? nil : hydration
            return JSONBody(value: view)
        }
        v1.delete("plans/:name") { _, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            try await wrap { try await store.deletePlan(named: name, actor: who.actor) }
            return Response(status: .noContent)
        }
        v1.post("plans/:name/jobs") { request, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            let body = try await request.decode(as: API.JobCreateRequest.self, context: context)
            if let point = body.point, point.utf8.count > 128 {
                throw APIError(error: FerryError(.badRequest, "a point is named in at most 128 bytes"))
            }
            return JSONBody(value: try await wrap { try await jobs.start(plan: name, request: body, actor: who.actor) }, status: .created)
        }
        v1.get("jobs") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await wrap { try await jobs.list() })
        }
        v1.get("jobs/:id") { _, context in
            _ = try context.require(.viewer)
            let id = try context.parameters.require("id")
            return JSONBody(value: try await wrap { try await jobs.view(id: id) })
        }
        v1.post("jobs/:id/resume") { _, context in
            let who = try context.require(.operator)
            let id = try context.parameters.require("id")
            return JSONBody(value: try await wrap { try await jobs.resume(id: id, actor: who.actor) })
        }
        v1.post("jobs/:id/cancel") { _, context in
            let who = try context.require(.operator)
            let id = try context.parameters.require("id")
            return JSONBody(value: try await wrap { try await jobs.cancel(id: id, actor: who.actor) })
        }
    }
}
