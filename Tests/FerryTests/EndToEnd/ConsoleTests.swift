import FerryWire
import Foundation
import Logging
import Testing
@testable import FerryControllerCore

/// The OpenAPI document checked against the router and a running controller, and the web
/// console driven in headless Chromium.
@Suite("OpenAPI document and web console", .serialized)
struct ConsoleTests {
    static let plan = """
        name: shop
        description: the shop's database
        groups:
          - name: db
            pre:
              - gate: "confirm the drill may start"
                timeout: 10m
            items:
              - host: db
                recovery-host: rec1
                start-hook: start
                stop-hook: stop
                timeout: 60s
        """

    /// A controller with NBD over TLS; db protects a 16 MiB volume in group `shop` (a crash
    /// point a second) under plan `shop`, which recovers it onto rec1; API tokens of each role.
    struct Site {
        let dir: TestDirectory
        let controller: ControllerProcess
        let agents: [ChildProcess]
        let tokens: [String: String]
        var api: String { controller.apiEnvironment["FERRY_API"] ?? "" }
    }

    func site() async throws -> Site {
        let dir = try TestDirectory()
        // Certificates valid 30 days are inside a 400-day warning window: alerts to show.
        try "alert-certificate-expiry: 400d\nalert-interval: 200ms\n".write(toFile: dir.file("controller.yaml"), atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"),
                                                           arguments: ["--config", dir.file("controller.yaml"), "--nbd-tls-listen", "127.0.0.1:0"])
        var agents: [ChildProcess] = []
        for host in ["db", "rec1"] {
            let config = dir.file("agent-\(host).yaml")
            try """
            hooks:
              start: "true"
              stop: "true"
            """.write(toFile: config, atomically: true, encoding: .utf8)
            agents.append(try await AgentProcess.enrollAndStart(host, controller: controller, in: dir, arguments: ["--config", config]))
            #expect(try await controller.waitFor(host, state: "online"))
        }
        let protect = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes-db") + "/data.img", "--create-size", "16M")
        #expect(protect.status == 0, "\(protect)")
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let r = try await controller.ctl("volume", "show", "db/data", "--json")
            guard r.status == 0, let v = try? API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8)) else { return false }
            return v.replicaState == .protected && (v.sync?.done ?? true)
        }, "db/data never became protected")
        let group = try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--crash-interval", "1s")
        #expect(group.status == 0, "\(group)")
        try Self.plan.write(toFile: dir.file("plan.yaml"), atomically: true, encoding: .utf8)
        let applied = try await controller.ctl("plan", "apply", "-f", dir.file("plan.yaml"))
        #expect(applied.status == 0, "\(applied)")
        var tokens: [String: String] = ["admin": controller.apiEnvironment["FERRY_TOKEN"] ?? ""]
        for role in ["viewer", "operator"] {
            let r = try await controller.ctl("api-token", "create", "console-\(role)", "--role", role)
            #expect(r.status == 0, "\(r)")
            tokens[role] = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return Site(dir: dir, controller: controller, agents: agents, tokens: tokens)
    }

    struct HTTPReply {
        var status: Int
        var contentType: String
        var body: Data
    }

    /// One HTTPS request with curl, trusting the controller's CA.
    func http(_ site: Site, _ method: String, _ path: String, token: String? = nil, body: String? = nil) async throws -> HTTPReply {
        let out = site.dir.file("curl-body")
        var args = ["-sS", "--cacert", site.controller.caPath, "-X", method, "-o", out, "-w", "%{http_code} %{content_type}"]
        if let token { args += ["-H", "Authorization: Bearer \(token)"] }
        if let body { args += ["-H", "Content-Type: application/json", "--data-binary", body] }
        let r = try await run("/usr/bin/curl", args + [site.api + path])
        let parts = r.stdout.split(separator: " ", maxSplits: 1)
        guard r.status == 0, let status = parts.first.flatMap({ Int($0) }) else { throw FerryError(.io, "curl \(method) \(path): \(r)") }
        return HTTPReply(status: status, contentType: parts.count > 1 ? String(parts[1]) : "",
                         body: FileManager.default.contents(atPath: out) ?? Data())
    }

    @Test("every route the controller registers is in the OpenAPI document, and every documented operation is a route")
    func documentMatchesRouter() async throws {
        let dir = try TestDirectory()
        var config = ControllerConfig(dataDir: dir.path)
        config.listen = "127.0.0.1:0"
        let parts = try await Controller(config: config, logger: Logger(label: "test")).assemble()
        // The console's static files are not the API: they are checked by the other tests.
        let registered = Set(parts.routes.router().routes.map { "\($0.method) \($0.path)" }.filter { !$0.contains(" /ui") })
        let documented = try OpenAPIDocument.operations()
        #expect(registered.count >= 40)
        #expect(registered.subtracting(documented).sorted() == [], "routes missing from openapi.yaml")
        #expect(documented.subtracting(registered).sorted() == [], "documented operations no route serves")
        #expect(!OpenAPIDocument.json.isEmpty, "openapi.yaml does not convert to JSON")
        // The typed states of the API models are the document's enums, case for case.
        let document = try JSONValue.parse(OpenAPIDocument.json)
        func enumValues(_ path: [String]) -> Set<String> {
            var node: JSONValue? = document["components"]?["schemas"]
            for p in path { node = node?[p] }
            return Set(node?["enum"]?.array?.compactMap(\.string) ?? [])
        }
        #expect(enumValues(["Host", "properties", "state"]) == Set(API.HostState.allCases.map(\.rawValue)))
        #expect(enumValues(["Volume", "properties", "state"]) == Set(API.VolumeState.allCases.map(\.rawValue)))
        #expect(enumValues(["Volume", "properties", "replicaState"]) == Set(API.ReplicaState.allCases.map(\.rawValue)))
        #expect(enumValues(["AlertRule"]) == Set(API.AlertRule.allCases.map(\.rawValue)))
        #expect(enumValues(["JobState"]) == Set(API.JobState.allCases.map(\.rawValue)))
        #expect(enumValues(["PlanState"]) == Set(API.PlanState.allCases.map(\.rawValue)))
        #expect(enumValues(["JobOperation"]) == Set(API.JobOperation.allCases.map(\.rawValue)))
        try await parts.replicaPool.shutdownGracefully()
    }

    @Test("every documented operation answers as documented: GETs match their schemas, each role gets what x-ferry-role says, the console's files are the repository's")
    func documentedOperationsAnswer() async throws {
        let site = try await site()
        defer { for a in site.agents { a.signal(SIGTERM) }; site.controller.process.signal(SIGTERM) }
        // A job, a point and an export, so the lists have entries to check.
        let drill = try await site.controller.ctl("drill", "shop", "--no-wait", "--json")
        #expect(drill.status == 0, "\(drill)")
        let job = try API.decoder().decode(API.Job.self, from: Data(drill.stdout.utf8))
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(200)) {
            let r = try await site.controller.ctl("job", "show", job.id, "--json")
            return (try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .waiting
        })
        #expect(try await site.controller.ctl("job", "cancel", job.id).status == 0)
        let point = try await site.controller.ctl("point", "create", "shop", "--json")
        #expect(point.status == 0, "\(point)")
        let exported = try await site.controller.ctl("volume", "export", "db/data", "--point", "latest", "--json")
        #expect(exported.status == 0, "\(exported)")
        let export = try API.decoder().decode(API.Export.self, from: Data(exported.stdout.utf8))
        // Lag history samples come with the agent's once-a-second reports.
        #expect(try await eventually(timeout: .seconds(15)) {
            try await http(site, "GET", "/v1/volumes/db/data/lag-history", token: site.tokens["viewer"]).body.count > 2
        })

        var alertID = ""
        #expect(try await eventually(timeout: .seconds(15)) {
            let r = try await site.controller.ctl("alerts", "--json")
            alertID = (try? API.decoder().decode([API.Alert].self, from: Data(r.stdout.utf8)))?.first?.id ?? ""
            return !alertID.isEmpty
        })

        let reply = try await http(site, "GET", "/v1/openapi.json")
        #expect(reply.status == 200 && reply.contentType.hasPrefix("application/json"))
        let document = try JSONValue.parse(reply.body)
        let check = JSONSchemaCheck(document: document)
        let yaml = try await http(site, "GET", "/v1/openapi.yaml")
        let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let source = repository.appendingPathComponent("Sources/FerryControllerCore")
        #expect(yaml.body == (try Data(contentsOf: source.appendingPathComponent("API/openapi.yaml"))),
                "the controller serves another openapi.yaml than the repository's: run python3 deploy/console/embed.py")
        for file in ["index.html", "app.js", "app.css"] {
            let served = try await http(site, "GET", "/ui/" + (file == "index.html" ? "" : file))
            #expect(served.status == 200, "\(file)")
            #expect(served.body == (try Data(contentsOf: source.appendingPathComponent("Console/Assets/\(file)"))),
                    "the controller serves another \(file) than the repository's: run python3 deploy/console/embed.py")
        }
        #expect(try await http(site, "GET", "/ui/nothing.js").status == 404)
        #expect(try await http(site, "GET", "/v1/no-such-route", token: site.tokens["admin"]).status == 404)

        let values = ["{name}": "db", "{host}": "db", "{id}": job.id]
        let paths = try #require(document["paths"]?.object)
        var answered = 0, unauthenticatedTries = 0
        for (template, item) in paths.sorted(by: { $0.key < $1.key }) {
            for (method, operation) in (item.object ?? [:]).sorted(by: { $0.key < $1.key }) where ["get", "put", "post", "delete"].contains(method) {
                var path = template
                let subject: [String: String] = template.hasPrefix("/v1/groups") || template.hasPrefix("/v1/plans") ? ["{name}": "shop"]
                    : template.hasPrefix("/v1/volumes/") ? ["{name}": "data"]
                    : template.hasPrefix("/v1/exports") ? ["{id}": export.id]
                    : template.hasPrefix("/v1/alerts") ? ["{id}": alertID]
                    : template.hasPrefix("/v1/api-tokens") ? ["{name}": "console-viewer"] : [:]
                for (k, v) in values.merging(subject, uniquingKeysWith: { $1 }) { path = path.replacingOccurrences(of: k, with: v) }
                let role = operation["x-ferry-role"]?.string ?? "?"
                let name = "\(method.uppercased()) \(template)"
                let body = method == "get" || method == "delete" ? nil : "{}"
                switch role {
                case "none":
                    let r = try await http(site, method.uppercased(), path)
                    #expect(r.status == 200, "\(name) without a token: \(r.status)")
                case "viewer", "operator", "admin":
                    // One role below what it needs is refused with a documented error.
                    if role != "viewer" {
                        let below = role == "admin" ? "operator" : "viewer"
                        let r = try await http(site, method.uppercased(), path, token: site.tokens[below], body: body)
                        #expect(r.status == 403, "\(name) as \(below): \(r.status) \(String(decoding: r.body, as: UTF8.self).prefix(200))")
                        let errors = check.errors(try JSONValue.parse(r.body), schema: .object(["$ref": .string("#/components/schemas/Error")]))
                        #expect(errors.isEmpty, "\(name): \(errors)")
                    }
                    // Without a token: refused (for 15 operations; 20 failed attempts a minute
                    // would rate-limit this address).
                    if unauthenticatedTries < 15 {
                        unauthenticatedTries += 1
                        let unauthenticated = try await http(site, method.uppercased(), path, body: body)
                        #expect(unauthenticated.status == 401, "\(name) without a token: \(unauthenticated.status)")
                    }
                    guard method == "get" else { break }
                    let r = try await http(site, "GET", path, token: site.tokens[role])
                    #expect(r.status == 200, "\(name) as \(role): \(r.status) \(String(decoding: r.body, as: UTF8.self).prefix(300))")
                    let content = operation["responses"]?["200"]?["content"]?.object ?? [:]
                    #expect(content.keys.contains(where: { r.contentType.hasPrefix($0) }), "\(name): served \(r.contentType), documented \(content.keys.sorted())")
                    if let schema = content["application/json"]?["schema"], r.status == 200 {
                        let errors = check.errors(try JSONValue.parse(r.body), schema: schema)
                        #expect(errors.isEmpty, "\(name): \(errors.prefix(10))")
                    }
                default:
                    Issue.record("\(name) has no x-ferry-role")
                }
                answered += 1
            }
        }
        #expect(answered >= 40)
    }

    @Test("the console in headless Chromium: sign in, see the host and the volume's state, start a drill, resume its gate, watch it finish; a viewer sees no write control and the API refuses it")
    func browser() async throws {
        let site = try await site()
        defer { for a in site.agents { a.signal(SIGTERM) }; site.controller.process.signal(SIGTERM) }
        let shots = ProcessInfo.processInfo.environment["FERRY_SCREENSHOTS"] ?? site.dir.sub("screenshots")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/console_browser.py").path
        let r = try await run("/usr/bin/python3", [script, "--url", site.api + "/ui/", "--operator", site.tokens["operator"] ?? "",
                                                   "--viewer", site.tokens["viewer"] ?? "", "--plan", "shop", "--volume", "db/data", "--host", "db",
                                                   "--group", "shop", "--screenshots", shots], timeout: .seconds(240))
        #expect(r.status == 0, "\(r)\n\(site.controller.process.log.suffix(3000))")
        // The drill the browser started ran for real, as the operator's token, through its gate.
        let jobs = try API.decoder().decode([API.Job].self, from: Data(try await site.controller.ctl("jobs", "--json").stdout.utf8))
        let drill = try #require(jobs.first { $0.operation == .drill })
        #expect(drill.state == .succeeded && drill.report["rpo_seconds"] != nil && drill.report["rto_seconds"] != nil, "\(drill)")
        let audit = try await site.controller.audit()
        #expect(audit.contains { $0.actor == "api:console-operator" && $0.action.hasPrefix("job.") }, "\(audit.prefix(10))")
        // What the viewer was not shown, the API refuses too.
        let refused = try await http(site, "POST", "/v1/plans/shop/jobs", token: site.tokens["viewer"], body: #"{"operation":"drill-cleanup"}"#)
        #expect(refused.status == 403)
        let resync = try await http(site, "POST", "/v1/volumes/db/data/resync", token: site.tokens["viewer"])
        #expect(resync.status == 403)
        for shot in ["dashboard", "volumes", "volume", "group", "plan", "job-gate", "drill-report", "viewer-plan"] {
            #expect(FileManager.default.fileExists(atPath: "\(shots)/\(shot).png"), "\(shot).png")
        }
    }
}
