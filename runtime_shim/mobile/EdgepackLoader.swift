// Loads an edgepack bundle in an iOS app with onnxruntime-objc (CocoaPods or Swift Package Manager
// coordinates in README.md). Add the bundle folder to the app as a folder reference, then:
//
//   let session = try EdgepackLoader.createSession(env: ORTEnv(loggingLevel: .warning), bundle: folderURL)
//   let session = try EdgepackLoader.createSession(env: env, bundle: folderURL, publicKeyPEM: signerKey)  // signed
//
// With publicKeyPEM (the signer's P-256 key, pinned in the app), model.sig must first be signed by that
// key (CryptoKit) over every file of the bundle: see verifySignature. Not compiled by edgepack's tests
// (no Swift toolchain for iOS on Linux); its Kotlin twin, EdgepackSignature.kt, is compiled and run.
// Every file is checked against manifest.json before the session is created. Refused, in this order
// for each manifest entry (sorted by path):
//   unsafe:  the entry's path is empty, absolute, has a backslash, or a "", "." or ".." segment
//   missing: no regular file at that path (a symbolic link counts as missing)
//   changed: the size differs, or the SHA-256 (read in 1 MiB chunks) differs
// then, walking the bundle folder:
//   extra:   a file the manifest does not list (manifest.json and model.sig excepted)
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
    static let signatureName = "model.sig"

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
                if rel != manifestName && rel != signatureName && files[rel] == nil { problems.append("extra: \(rel)") }
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

    /// The signer's fingerprint once model.sig (OpenSSF model-signing format: a Sigstore bundle with a DSSE
    /// envelope around an in-toto statement of every file's SHA-256) is signed by `publicKeyPEM` and lists
    /// exactly the manifest's digests plus manifest.json's own; `verify` then ties every byte to the manifest.
    static func verifySignature(bundle: URL, publicKeyPEM: String) throws -> String {
        func refuse(_ problem: String) -> BundleVerificationError { BundleVerificationError(problems: ["signature: \(problem)"]) }
        let key: P256.Signing.PublicKey
        do { key = try P256.Signing.PublicKey(pemRepresentation: publicKeyPEM) } catch { throw refuse("the public key is not a P-256 PEM key") }
        let pem = "-----BEGIN PUBLIC KEY-----\n"
            + key.derRepresentation.base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
            + "\n-----END PUBLIC KEY-----\n"
        let fingerprint = SHA256.hash(data: Data(pem.utf8)).map { String(format: "%02x", $0) }.joined()
        guard let data = try? Data(contentsOf: bundle.appendingPathComponent(signatureName)) else {
            throw refuse("the bundle is not signed (no \(signatureName)) and a signature by key \(fingerprint) is required")
        }
        guard let document = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
              document["mediaType"] as? String == "application/vnd.dev.sigstore.bundle.v0.3+json",
              let envelope = document["dsseEnvelope"] as? [String: Any],
              envelope["payloadType"] as? String == "application/vnd.in-toto+json",
              let signatures = envelope["signatures"] as? [[String: Any]], signatures.count == 1,
              let payload = Data(base64Encoded: envelope["payload"] as? String ?? ""),
              let der = Data(base64Encoded: signatures[0]["sig"] as? String ?? "")
        else { throw refuse("\(signatureName) is not a model-signing key signature") }
        let hint = ((document["verificationMaterial"] as? [String: Any])?["publicKey"] as? [String: Any])?["hint"] as? String ?? ""
        if !hint.isEmpty && hint != fingerprint {
            throw refuse("signed with another key: \(signatureName) names key \(hint), the required key is \(fingerprint)")
        }
        let payloadType = "application/vnd.in-toto+json"
        let signed = Data("DSSEv1 \(payloadType.utf8.count) \(payloadType) \(payload.count) ".utf8) + payload
        guard let signature = try? P256.Signing.ECDSASignature(derRepresentation: der),
              key.isValidSignature(signature, for: signed)  // SHA-256 of `signed`, as model-signing signs it
        else { throw refuse("the signature does not verify with key \(fingerprint) (tampered, or signed with another key)") }

        let manifestURL = bundle.appendingPathComponent(manifestName)
        guard let manifestData = try? Data(contentsOf: manifestURL),
              let manifest = (try? JSONSerialization.jsonObject(with: manifestData)) as? [String: Any],
              let files = manifest["files"] as? [String: [String: Any]]
        else { throw refuse("cannot read \(manifestName)") }
        var digests = files.mapValues { $0["sha256"] as? String ?? "" }
        digests[manifestName] = SHA256.hash(data: manifestData).map { String(format: "%02x", $0) }.joined()
        guard let statement = (try? JSONSerialization.jsonObject(with: payload)) as? [String: Any],
              statement["predicateType"] as? String == "https://model_signing/signature/v1.0",
              let predicate = statement["predicate"] as? [String: Any],
              let serialization = predicate["serialization"] as? [String: Any],
              serialization["method"] as? String == "files", serialization["hash_type"] as? String == "sha256",
              let resources = predicate["resources"] as? [[String: Any]],
              let subject = ((statement["subject"] as? [[String: Any]])?.first?["digest"] as? [String: Any])?["sha256"] as? String
        else { throw refuse("the signed statement is not a model-signing v1.0 files/sha256 statement") }
        var listed: [String: String] = [:]
        var root = SHA256()
        for resource in resources {
            guard resource["algorithm"] as? String == "sha256", let name = resource["name"] as? String,
                  let digest = resource["digest"] as? String, digest.count == 64,
                  let bytes = hexBytes(digest)
            else { throw refuse("the signed statement is malformed") }
            listed[name] = digest
            root.update(data: bytes)
        }
        if root.finalize().map({ String(format: "%02x", $0) }).joined() != subject {
            throw refuse("the signed statement is inconsistent (its subject digest does not match its resources)")
        }
        let found: [(String, [String])] = [
            ("not signed", digests.keys.filter { listed[$0] == nil }.sorted()),
            ("signed but not in the bundle", listed.keys.filter { digests[$0] == nil }.sorted()),
            ("changed since signing", digests.keys.filter { listed[$0] != nil && listed[$0] != digests[$0] }.sorted()),
        ]
        let problems = found.filter { !$0.1.isEmpty }.map { "\($0.0): \($0.1.joined(separator: ", "))" }
        if !problems.isEmpty { throw refuse(problems.joined(separator: "; ")) }
        return fingerprint
    }

    static func hexBytes(_ hex: String) -> Data? {
        var data = Data()
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            data.append(byte)
            index = next
        }
        return data
    }

    /// The manifest's entry for model `name` of a multi-model bundle ("models"), or "model" when `name` is nil
    /// (the bundle's first model) or the one model's name; an unknown name throws, listing the names.
    static func modelEntry(manifest: [String: Any], name: String?) throws -> [String: Any] {
        guard let first = manifest["model"] as? [String: Any], let file = first["file"] as? String else {
            throw BundleVerificationError(problems: ["manifest: no model file"])
        }
        guard let name else { return first }
        guard let models = manifest["models"] as? [String: Any] else {
            let only = URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent
            if only == name { return first }
            throw BundleVerificationError(problems: ["this bundle has no model \(name); it holds: \(only)"])
        }
        guard let entry = models[name] as? [String: Any] else {
            throw BundleVerificationError(problems: ["this bundle has no model \(name); it holds: \(models.keys.sorted().joined(separator: ", "))"])
        }
        return entry
    }

    /// `modelName`: which model of a multi-model bundle (nil: the first); every file is verified whichever is opened.
    static func createSession(env: ORTEnv, bundle: URL, publicKeyPEM: String? = nil, modelName: String? = nil) throws -> ORTSession {
        if let publicKeyPEM { _ = try verifySignature(bundle: bundle, publicKeyPEM: publicKeyPEM) }
        let manifest = try verify(bundle: bundle)
        let entry = try modelEntry(manifest: manifest, name: modelName)
        let data = try Data(contentsOf: bundle.appendingPathComponent(sessionOptionsName))
        guard let settings = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw BundleVerificationError(problems: ["\(sessionOptionsName) is not a JSON object"])
        }
        let options = try ORTSessionOptions()
        try options.setIntraOpNumThreads(Int32(settings["intra_op_num_threads"] as? Int ?? 0))
        let levels: [String: ORTGraphOptimizationLevel] = ["disable": .none, "basic": .basic, "extended": .extended, "all": .all]
        try options.setGraphOptimizationLevel(levels[settings["graph_optimization_level"] as? String ?? "all"] ?? .all)
        // includes session.load_model_format=ORT and session.enable_saved_runtime_optimizations=1
        for (key, value) in (entry["config_entries"] ?? settings["config_entries"]) as? [String: String] ?? [:] {
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
        guard let file = entry["file"] as? String else {
            throw BundleVerificationError(problems: ["manifest: no model file"])
        }
        return try ORTSession(env: env, modelPath: bundle.appendingPathComponent(file).path, sessionOptions: options)
    }
}
