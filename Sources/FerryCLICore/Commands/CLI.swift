import ArgumentParser
import FerryWire
import Foundation

/// Error reporting shared by every command.
enum CLI {
    /// Runs a command body. Any failure prints exactly one line, `ferryctl: <message>`, to stderr
    /// and exits 1; ArgumentParser's own exits (help, usage errors, explicit codes) pass through.
    static func guarded(isolation: isolated (any Actor)? = #isolation, _ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let error as ExitCode {
            throw error
        } catch let error as CleanExit {
            throw error
        } catch let error as FerryError {
            throw report(error.message)
        } catch let error as EncodingError {
            throw report("cannot encode JSON: \(error.localizedDescription)")
        } catch {
            throw report(TransportErrors.firstLine(String(describing: error)))
        }
    }

    /// Prints the one error line; the returned `ExitCode` makes ArgumentParser exit 1 silently.
    static func report(_ message: String) -> ExitCode {
        Console.note("ferryctl: " + Text.printable(message))
        return ExitCode.failure
    }
}

extension ConnectionOptions {
    /// Resolves the settings and runs `body` with a client that is always shut down.
    func withClient<Result>(requireToken: Bool = true,
                            isolation: isolated (any Actor)? = #isolation,
                            _ body: (APIClient) async throws -> Result) async throws -> Result {
        try await APIClient.withClient(settings(requireToken: requireToken), body)
    }
}
