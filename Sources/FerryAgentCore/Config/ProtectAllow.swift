import FerryWire
import Foundation

/// What the controller may make this agent open and write (`protect-allow`): the host's
/// decision, whatever token asked, so a stolen controller or token cannot pick a path.
///
/// The decision is made on real paths (symlinks and `..` resolved), so neither a `../` in the
/// path asked for nor a symlink planted under an allowed directory escapes it.
public struct ProtectAllow: Sendable, Equatable {
    public enum Rule: Sendable, Equatable {
        /// Exactly this file or device (a symlink such as `/dev/disk/by-id/…` is resolved).
        case exact(String)
        /// Anything below this directory (written with a trailing `/`).
        case under(String)
        /// Any block device not in use: not mounted, holding no mounted partition, not swap,
        /// not built on by device-mapper or md.
        case unusedBlockDevices
    }

    /// The `protect-allow` entry that stands for `unusedBlockDevices`.
    public static let unusedBlockDevicesKeyword = "unused-block-devices"

    public var rules: [Rule]

    public init(rules: [Rule]) { self.rules = rules }

    /// The default: images under `DATA-DIR/volumes/`, and block devices not in use.
    public static func defaults(dataDir: String) -> ProtectAllow {
        ProtectAllow(rules: [.under(dataDir + "/volumes/"), .unusedBlockDevices])
    }

    /// Parses config entries: absolute paths, a trailing `/` for a directory, or the keyword.
    public init(entries: [String]) throws {
        rules = try entries.map { entry in
            if entry == Self.unusedBlockDevicesKeyword { return .unusedBlockDevices }
            guard entry.hasPrefix("/"), entry.count > 1 else {
                throw FerryError(.badConfiguration, "protect-allow entries are absolute paths (a directory ends in '/') or \(Self.unusedBlockDevicesKeyword), not '\(entry)'")
            }
            guard !entry.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }) else {
                throw FerryError(.badConfiguration, "protect-allow entry '\(entry)' must not contain '.' or '..' components")
            }
            return entry.hasSuffix("/") ? .under(entry) : .exact(entry)
        }
    }

    /// The list as the operator wrote it, for messages.
    public var description: String {
        rules.isEmpty ? "empty" : rules.map {
            switch $0 {
            case .exact(let p), .under(let p): p
            case .unusedBlockDevices: Self.unusedBlockDevicesKeyword
            }
        }.joined(separator: ", ")
    }

    /// What a resolved path is.
    public enum Kind: Sendable, Equatable {
        case regular
        /// A block device; `inUse` says why it is in use, if it is.
        case blockDevice(inUse: String?)
        /// Not there yet (an image to create): the path is its resolved parent plus its name.
        case missing
        /// Anything else (a directory, a character device, a socket…), described.
        case other(String)
    }

    /// Why `resolved` (a real path: no symlinks, no `..`) is refused, or nil when it is allowed.
    /// `rules` must be resolved too (see `resolvedRules`). Pure: the facts are passed in.
    public static func refusal(resolved: String, kind: Kind, rules: [Rule], listed: String) -> String? {
        if case .other(let what) = kind { return "it is \(what), neither an image file nor a block device" }
        var deviceInUse: String?
        for rule in rules {
            switch rule {
            case .exact(let path) where path == resolved:
                return nil
            case .under(let directory) where resolved.hasPrefix(directory) && resolved.count > directory.count:
                return nil
            case .unusedBlockDevices:
                if case .blockDevice(let inUse) = kind {
                    guard let inUse else { return nil }
                    deviceInUse = inUse
                }
            default:
                continue
            }
        }
        if let deviceInUse { return "it is a block device in use (\(deviceInUse)) and not listed in protect-allow (\(listed))" }
        return "not under its protect-allow list (\(listed))"
    }

    /// The decision on one path, on this host's real files: nil when allowed, else why not.
    /// Blocking (stat, realpath, /proc and /sys reads): call it off actors and event loops.
    public func check(_ path: String) -> (resolved: String, refusal: String?) {
        let (resolved, kind) = Self.resolve(path)
        guard let resolved else {
            if case .other(let why) = kind { return (path, why) }
            return (path, "it cannot be resolved")
        }
        let kindWithUse: Kind
        if case .blockDevice = kind {
            kindWithUse = .blockDevice(inUse: HostStorage.current().inUse(device: resolved))
        } else {
            kindWithUse = kind
        }
        return (resolved, Self.refusal(resolved: resolved, kind: kindWithUse, rules: resolvedRules(), listed: description))
    }

    /// The rules with their paths resolved as far as they exist, so `/srv -> /data` matches.
    func resolvedRules() -> [Rule] {
        rules.map { rule in
            switch rule {
            case .exact(let p): .exact(Self.realPath(p) ?? p)
            case .under(let d): .under(Self.realPath(String(d.dropLast())).map { $0 == "/" ? $0 : $0 + "/" } ?? d)
            case .unusedBlockDevices: .unusedBlockDevices
            }
        }
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// The real path and what is there. A missing file resolves through its nearest existing
    /// ancestor; a `..` below a missing directory, or a dangling symlink, is refused (kind
    /// `.other` with the reason, resolved nil).
    static func resolve(_ path: String) -> (String?, Kind) {
        guard path.hasPrefix("/") else { return (nil, .other("not an absolute path")) }
        if let real = realPath(path) {
            var st = stat()
            guard stat(real, &st) == 0 else { return (nil, .other("cannot be read: \(String(cString: strerror(errno)))")) }
            switch st.st_mode & S_IFMT {
            case S_IFREG: return (real, .regular)
            case S_IFBLK: return (real, .blockDevice(inUse: nil))
            case S_IFDIR: return (real, .other("a directory"))
            case S_IFCHR: return (real, .other("a character device"))
            default: return (real, .other("a special file"))
            }
        }
        var st = stat()
        if lstat(path, &st) == 0 { return (nil, .other("it is a symlink to a missing file")) }
        // Walk up to the nearest existing ancestor; what follows it must be plain names.
        var missing: [Substring] = []
        var components = path.split(separator: "/")
        while let last = components.popLast() {
            missing.insert(last, at: 0)
            let ancestor = "/" + components.joined(separator: "/")
            if let real = realPath(ancestor) {
                guard !missing.contains(where: { $0 == ".." || $0 == "." }) else {
                    return (nil, .other("it names '..' below a directory that does not exist"))
                }
                return ((real == "/" ? "" : real) + "/" + missing.joined(separator: "/"), .missing)
            }
        }
        return (nil, .other("it cannot be resolved"))
    }
}
