// Loads an edgepack bundle in an iOS app with onnxruntime-objc (CocoaPods or Swift Package Manager
// coordinates in README.md). Add the bundle folder to the app as a folder reference, then:
//
//   let session = try EdgepackLoader.createSession(env: ORTEnv(loggingLevel: .warning), bundle: folderURL)
//
// Every file is checked against manifest.json before the session is created. Refused, in this order
// for each manifest entry (sorted by path):
//   unsafe:  the entry's path is empty, absolute, has a backslash, or a "", "." or ".." segment
//   missing: no regular file at that path (a symbolic link counts as missing)
//   changed: the size differs, or the SHA-256 (read in 1 MiB chunks) differs
// then, walking the bundle folder:
//   extra:   a file the manifest does not list (manifest.json itself excepted)
import CryptoKit
import Foundation
import onnxruntime_objc

struct BundleVerificationError: Error, CustomStringConvertible {
    let problems: [String]
    var description: String { "bundle does not match its manifest:\n  " + problems.joined(separator: "\n  ") }
}

enum EdgepackLoader {
    static let manifestName = "manifest.json"
    static let schema = "edgepack.manifest/1"
    static let sessionOptionsName = "session_options.json"

    /// The parsed manifest, once every file of `bundle` matches it.
    static func verify(bundle: URL) throws -> [String: Any] {
        guard let data = try? Data(contentsOf: bundle.appendingPathComponent(manifestName)),
              let manifest = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        else { throw BundleVerificationError(problems: ["manifest: cannot read \(manifestName)"]) }
        guard manifest["schema"] as? String == schema, let files = manifest["files"] as? [String: Any] else {
            throw BundleVerificationError(problems: ["manifest: \(manifestName) is not an edgepack manifest (\(schema))"])
        }
        var problems: [String] = []
        let fm = FileManager.default
        for rel in files.keys.sorted() {
            guard let entry = files[rel] as? [String: Any], isSafe(rel) else {
                problems.append("unsafe: \(rel)")
                continue
            }
            let url = bundle.appendingPathComponent(rel)
            guard let attributes = try? fm.attributesOfItem(atPath: url.path),
                  attributes[.type] as? FileAttributeType == .typeRegular
            else {
                problems.append("missing: \(rel)")
                continue
            }
            let size = (attributes[.size] as? NSNumber)?.int64Value ?? -1
            let expectedSize = (entry["size"] as? NSNumber)?.int64Value ?? -2
            if size != expectedSize || (try? sha256(url)) != entry["sha256"] as? String {
                problems.append("changed: \(rel)")
            }
        }
        let root = bundle.standardizedFileURL.path
        if let walker = fm.enumerator(atPath: root) {
            while let rel = walker.nextObject() as? String {
                var isDirectory: ObjCBool = false
                let path = (root as NSString).appendingPathComponent(rel)
                let isLink = (try? fm.attributesOfItem(atPath: path))?[.type] as? FileAttributeType == .typeSymbolicLink
                if fm.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue, !isLink { continue }
                if rel != manifestName && files[rel] == nil { problems.append("extra: \(rel)") }
            }
        }
        if !problems.isEmpty { throw BundleVerificationError(problems: problems) }
        return manifest
    }

    static func isSafe(_ rel: String) -> Bool {
        !rel.isEmpty && !rel.hasPrefix("/") && !rel.contains("\\")
            && !rel.split(separator: "/", omittingEmptySubsequences: false).contains { $0.isEmpty || $0 == "." || $0 == ".." }
    }

    /// Lowercase hex SHA-256 of the file at `url`, streamed: a model never has to fit in memory.
    static func sha256(_ url: URL) throws -> String {
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        var hasher = SHA256()
        while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }

    static func createSession(env: ORTEnv, bundle: URL) throws -> ORTSession {
        let manifest = try verify(bundle: bundle)
        let data = try Data(contentsOf: bundle.appendingPathComponent(sessionOptionsName))
        guard let settings = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw BundleVerificationError(problems: ["\(sessionOptionsName) is not a JSON object"])
        }
        let options = try ORTSessionOptions()
        try options.setIntraOpNumThreads(Int32(settings["intra_op_num_threads"] as? Int ?? 0))
        let levels: [String: ORTGraphOptimizationLevel] = ["disable": .none, "basic": .basic, "extended": .extended, "all": .all]
        try options.setGraphOptimizationLevel(levels[settings["graph_optimization_level"] as? String ?? "all"] ?? .all)
        // includes session.load_model_format=ORT and session.enable_saved_runtime_optimizations=1
        for (key, value) in settings["config_entries"] as? [String: String] ?? [:] {
            try options.addConfigEntry(withKey: key, value: value)
        }
        let caches = FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask)[0].path
        for provider in settings["execution_providers"] as? [[String: Any]] ?? [] {
            switch provider["name"] as? String {
            case "CoreMLExecutionProvider":
                var coreml: [String: String] = [:]
                for (key, value) in provider["options"] as? [String: Any] ?? [:] {
                    coreml[key] = "\(value)".replacingOccurrences(of: "$CACHES", with: caches)
                }
                if let folder = coreml["ModelCacheDirectory"] {
                    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
                }
                try options.appendCoreMLExecutionProvider(withOptionsV2: coreml)
            case "CPUExecutionProvider":
                break  // always there, after the others
            case let name:
                throw BundleVerificationError(problems: ["\(sessionOptionsName) names \(name ?? "?"), which this loader cannot add"])
            }
        }
        guard let model = manifest["model"] as? [String: Any], let file = model["file"] as? String else {
            throw BundleVerificationError(problems: ["manifest: no model file"])
        }
        return try ORTSession(env: env, modelPath: bundle.appendingPathComponent(file).path, sessionOptions: options)
    }
}
