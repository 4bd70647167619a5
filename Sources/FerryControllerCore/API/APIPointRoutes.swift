import FerryWire
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// Consistency groups, recovery points and point-in-time images.
extension APIRoutes {
    /// Most volumes in one group.
    static let maxGroupVolumes = 1024

    func addPointRoutes(_ v1: RouterGroup<APIContext>) {
        v1.post("groups") { request, context in
            let who = try context.require(.operator)
            let body = try await request.decode(as: API.GroupCreateRequest.self, context: context)
            return JSONBody(value: try await wrap { try await createGroup(body, actor: who.actor) }, status: .created)
        }
        v1.get("groups") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await wrap { try await groupViews() })
        }
        v1.get("groups/:name") { _, context in
            _ = try context.require(.viewer)
            let name = try context.parameters.require("name")
            return JSONBody(value: try await wrap { try await groupView(name) })
        }
        v1.put("groups/:name") { request, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            var body = try await request.decode(as: API.GroupCreateRequest.self, context: context)
            guard body.name.isEmpty || body.name == name else {
                throw APIError(error: FerryError(.badRequest, "a group cannot be renamed ('\(name.prefix(64))' → '\(body.name.prefix(64))')"))
            }
            body.name = name
            return JSONBody(value: try await wrap { try await updateGroup(body, actor: who.actor) })
        }
        v1.delete("groups/:name") { _, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            try await wrap { try await store.deleteGroup(name: name, actor: who.actor) }
            return Response(status: .noContent)
        }
        v1.get("groups/:name/points") { _, context in
            _ = try context.require(.viewer)
            let name = try context.parameters.require("name")
            return JSONBody(value: try await wrap { try await pointViews(group: name) })
        }
        v1.post("groups/:name/points") { request, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            let body = try await request.decode(as: API.PointCreateRequest.self, context: context)
            if let label = body.label, label.utf8.count > 200 {
                throw APIError(error: FerryError(.badRequest, "a point label is at most 200 bytes"))
            }
            let point = try await wrap {
                try await coordinator.takePoint(group: name, app: body.app ?? false, manual: true, label: body.label, actor: who.actor)
            }
            return JSONBody(value: try await wrap { try await pointView(point, hosts: hostNames()) }, status: .created)
        }
        v1.post("volumes/:host/:name/exports") { request, context in
            let who = try context.require(.operator)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            let body = try await request.decode(as: API.ExportCreateRequest.self, context: context)
            let export = try await wrap {
                let principals = try await exportPrincipals(body.hosts ?? [])
                let (record, replica, hostID) = try await volumeReplica(host: host, name: name)
                let (position, point) = try await catalogue.resolve(hostID: hostID, hostName: host, volume: record.name, choice: body.point, asOf: body.asOf)
                let view = try await exports.create(volume: "\(host)/\(name)", replica: replica, position: position, point: point,
                                                    writable: body.writable ?? false, principals: principals)
                try await store.audit(actor: who.actor, action: "volume.export", target: "\(host)/\(name)",
                                      detail: "\(view.id) point=\(point) writable=\(view.writable) for=\(view.hosts.isEmpty ? "local-only" : view.hosts.joined(separator: ","))")
                return view
            }
            return JSONBody(value: export, status: .created)
        }
        v1.get("exports") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: await exports.list())
        }
        v1.delete("exports/:id") { _, context in
            let who = try context.require(.operator)
            let id = try context.parameters.require("id")
            try await wrap {
                try await exports.remove(id: id)
                try await store.audit(actor: who.actor, action: "export.remove", target: id)
            }
            return Response(status: .noContent)
        }
        v1.get("volumes/:host/:name/image") { request, context in
            let who = try context.require(.operator)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            let choice = request.uri.queryParameters.get("point")
            var asOf: Date?
            if let text = request.uri.queryParameters.get("as-of") {
                guard let date = ISO8601DateFormatter().date(from: text) else {
                    throw APIError(error: FerryError(.badRequest, "as-of must be an ISO 8601 time such as 2026-11-24T10:42:07Z, not '\(text)'"))
                }
                asOf = date
            }
            let (image, point) = try await wrap {
                let (record, replica, hostID) = try await volumeReplica(host: host, name: name)
                let (position, point) = try await catalogue.resolve(hostID: hostID, hostName: host, volume: record.name, choice: choice, asOf: asOf)
                let image = try await replica.openImage(at: position)
                // A download carries a whole disk off the controller: who took which point is recorded.
                do {
                    try await store.audit(actor: who.actor, action: "volume.download", target: "\(host)/\(name)", detail: "point=\(point)")
                } catch {
                    try? image.close()
                    throw error
                }
                return (image, point)
            }
            let pool = replicas.pool
            let size = image.size
            let body = ResponseBody(contentLength: Int(size)) { writer in
                defer { try? image.close() }
                var offset: UInt64 = 0
                let chunk = 1 << 20
                while offset < size {
                    let length = Int(min(UInt64(chunk), size - offset))
                    let at = offset
                    let buffer = try await pool.runIfActive { () throws -> ByteBuffer in
                        var b = ByteBuffer()
                        b.reserveCapacity(length)
                        try image.read(offset: at, length: length, into: &b)
                        return b
                    }
                    try await writer.write(buffer)
                    offset += UInt64(length)
                }
                try await writer.finish(nil)
            }
            return Response(status: .ok, headers: [.contentType: "application/octet-stream", HTTPField.Name("X-Ferry-Point")!: point], body: body)
        }
    }

    /// Most hosts one export is made for.
    static let maxExportHosts = 64

    /// The hosts an export is made for, by id, with their names: each must be enrolled and
    /// not removed.
    func exportPrincipals(_ names: [String]) async throws -> [String: String] {
        guard names.count <= Self.maxExportHosts else {
            throw FerryError(.badRequest, "an export is made for at most \(Self.maxExportHosts) hosts, not \(names.count)")
        }
        var principals: [String: String] = [:]
        for name in names {
            guard let host = try await store.host(named: name) else {
                throw FerryError(.notFound, "no host named '\(name)' (in --for); 'ferryctl hosts' lists them")
            }
            principals[host.id] = host.name
        }
        return principals
    }

    func hostNames() async throws -> [String: String] {
        Dictionary(uniqueKeysWithValues: try await store.hosts().map { ($0.id, $0.name) })
    }

    /// A protected volume, its replica and its host id.
    func volumeReplica(host: String, name: String) async throws -> (VolumeRecord, ReplicaStore, String) {
        guard let h = try await store.host(named: host) else {
            throw FerryError(.notFound, "no host named '\(host)'; 'ferryctl hosts' lists them")
        }
        guard let record = try await store.volumes(hostID: h.id).first(where: { $0.name == name }) else {
            throw FerryError(.notFound, "no volume \(host)/\(name); 'ferryctl volumes' lists them")
        }
        let replica = try await replicas.replica(hostID: h.id, volume: name, size: UInt64(record.sizeBytes))
        return (record, replica, h.id)
    }

    func createGroup(_ body: API.GroupCreateRequest, actor: String) async throws -> API.Group {
        let (policy, members) = try await groupMembers(body)
        try await store.createGroup(name: body.name, policy: policy, members: members, actor: actor)
        return try await groupView(body.name)
    }

    /// One group as the API shows it.
    func groupView(_ name: String) async throws -> API.Group {
        guard let view = try await groupViews().first(where: { $0.name == name }) else {
            throw FerryError(.notFound, "no consistency group named '\(name)'; 'ferryctl groups' lists them")
        }
        return view
    }

    /// Changes a group's members and policy in place: its points stay; the next round cuts
    /// with the new members and the scheduler follows the new policy.
    func updateGroup(_ body: API.GroupCreateRequest, actor: String) async throws -> API.Group {
        let (policy, members) = try await groupMembers(body)
        try await store.updateGroup(name: body.name, policy: policy, members: members, actor: actor)
        return try await groupView(body.name)
    }

    /// A group request checked: its policy, and its volumes as member records.
    func groupMembers(_ body: API.GroupCreateRequest) async throws -> (API.GroupPolicy, [GroupMemberRecord]) {
        guard HostName.isValid(body.name) else {
            throw FerryError(.badRequest, "'\(body.name)' is not a valid group name (1-63 characters: letters, digits, '.', '-', '_'; not starting with '.')")
        }
        guard !body.volumes.isEmpty, body.volumes.count <= Self.maxGroupVolumes else {
            throw FerryError(.badRequest, "a group has 1 to \(Self.maxGroupVolumes) volumes, not \(body.volumes.count)")
        }
        guard Set(body.volumes).count == body.volumes.count else { throw FerryError(.badRequest, "a volume is named twice") }
        let policy = body.policy ?? API.GroupPolicy()
        try Retention.validate(policy)
        let hosts = try await store.hosts()
        var members: [GroupMemberRecord] = []
        for v in body.volumes {
            let parts = v.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw FerryError(.badRequest, "'\(v)' is not HOST/VOLUME")
            }
            guard let host = hosts.first(where: { $0.name == parts[0] }) else {
                throw FerryError(.notFound, "no host named '\(parts[0])' (in '\(v)'); 'ferryctl hosts' lists them")
            }
            guard let record = try await store.volumes(hostID: host.id).first(where: { $0.name == parts[1] }) else {
                throw FerryError(.badRequest, "\(v) is not a protected volume; protect it first ('ferryctl protect \(parts[0]) --volume \(parts[1]) --path PATH')")
            }
            guard record.captureMode == "export" else {
                throw FerryError(.badRequest, "\(v) is captured by scanning: its writes cannot be held for a consistent cut")
            }
            members.append(GroupMemberRecord(groupName: body.name, hostID: host.id, volume: record.name))
        }
        return (policy, members)
    }

    func groupViews() async throws -> [API.Group] {
        let names = try await hostNames()
        let errors = await coordinator.lastError
        var views: [API.Group] = []
        for (g, members) in try await store.groups() {
            let policy = g.decodedPolicy
            let points = try await store.points(group: g.name)
            let newest = points.map(\.createdAt).max()
            let rpo = newest.map { Date().timeIntervalSince($0) }
            views.append(API.Group(
                name: g.name, volumes: members.map { "\(names[$0.hostID] ?? $0.hostID)/\($0.volume)" }, policy: policy, createdAt: g.createdAt,
                points: points.count, newestPoint: newest, rpoSeconds: rpo,
                rpoAlert: (rpo ?? Date().timeIntervalSince(g.createdAt)) > Double(policy.rpoAlertSeconds), lastRoundError: errors[g.name]))
        }
        return views
    }

    func pointViews(group: String) async throws -> [API.Point] {
        guard try await store.group(named: group) != nil else {
            throw FerryError(.notFound, "no consistency group named '\(group)'; 'ferryctl groups' lists them")
        }
        let names = try await hostNames()
        var views: [API.Point] = []
        for p in try await store.points(group: group) { views.append(try await pointView(p, hosts: names)) }
        return views
    }

    func pointView(_ p: PointRecord, hosts: [String: String]) async throws -> API.Point {
        API.Point(
            id: p.id, group: p.groupName, createdAt: p.createdAt, kind: p.kind, consistency: p.consistency, label: p.label,
            hookError: p.hookError,
            members: p.decodedMembers.map { API.PointMember(volume: "\(hosts[$0.hostID] ?? $0.hostID)/\($0.volume)", epoch: $0.epoch, sequence: $0.sequence) },
            complete: await catalogue.isComplete(p), pauseMicros: p.pauseMicros.map { UInt64(clamping: $0) })
    }
}
