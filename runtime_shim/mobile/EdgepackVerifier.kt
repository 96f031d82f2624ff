// Checks an edgepack bundle against its manifest.json before anything in it is loaded.
// Plain JVM + org.json (built into Android): no other dependency, so it can be tested off-device.
//
// Refused, in this order for each manifest entry (sorted by path):
//   unsafe:  the entry's path is empty, absolute, has a backslash, or a "", "." or ".." segment
//   missing: no regular file at that path (a symbolic link counts as missing)
//   changed: the size differs, or the SHA-256 (read in 1 MiB chunks) differs
// then, walking the bundle folder:
//   extra:   a file the manifest does not list (manifest.json and model.sig excepted: EdgepackSignature.kt)
package ai.edgepack

import org.json.JSONObject
import java.io.File
import java.io.FileInputStream
import java.nio.file.Files
import java.security.MessageDigest

class BundleVerificationException(val problems: List<String>) :
    Exception("bundle does not match its manifest:\n  " + problems.joinToString("\n  "))

object EdgepackVerifier {
    const val MANIFEST = "manifest.json"
    const val SCHEMA = "edgepack.manifest/1"
    const val SIGNATURE = "model.sig"

    /** The parsed manifest, once every file of [bundle] matches it; otherwise a [BundleVerificationException]. */
    fun verify(bundle: File): JSONObject {
        val manifest = try {
            JSONObject(File(bundle, MANIFEST).readText(Charsets.UTF_8))
        } catch (e: Exception) {
            throw BundleVerificationException(listOf("manifest: cannot read $MANIFEST: ${e.message}"))
        }
        val files = manifest.optJSONObject("files")
        if (manifest.optString("schema") != SCHEMA || files == null) {
            throw BundleVerificationException(listOf("manifest: $MANIFEST is not an edgepack manifest ($SCHEMA)"))
        }
        val problems = mutableListOf<String>()
        val listed = files.keys().asSequence().toSortedSet()
        for (rel in listed) {
            val entry = files.optJSONObject(rel)
            if (entry == null || !isSafe(rel)) {
                problems.add("unsafe: $rel")
                continue
            }
            val file = File(bundle, rel)
            if (Files.isSymbolicLink(file.toPath()) || !file.isFile) {
                problems.add("missing: $rel")
            } else if (file.length() != entry.optLong("size", -1L) || sha256(file) != entry.optString("sha256")) {
                problems.add("changed: $rel")
            }
        }
        bundle.walkTopDown().filter { it != bundle && !it.isDirectory }.forEach {
            val rel = it.relativeTo(bundle).invariantSeparatorsPath
            if (rel != MANIFEST && rel != SIGNATURE && rel !in listed) problems.add("extra: $rel")
        }
        if (problems.isNotEmpty()) throw BundleVerificationException(problems)
        return manifest
    }

    /**
     * The manifest's entry for the model [name] of a multi-model bundle ("models"), or "model" when [name]
     * is null (the bundle's first model) or is the one model's name; an unknown name throws, listing the names.
     */
    fun modelEntry(manifest: JSONObject, name: String?): JSONObject {
        val first = manifest.getJSONObject("model")
        if (name == null) return first
        val models = manifest.optJSONObject("models")
        if (models == null) {
            if (File(first.getString("file")).nameWithoutExtension == name) return first
            throw IllegalArgumentException("this bundle has no model $name; it holds: ${File(first.getString("file")).nameWithoutExtension}")
        }
        if (!models.has(name)) {
            throw IllegalArgumentException("this bundle has no model $name; it holds: ${models.keys().asSequence().joinToString(", ")}")
        }
        return models.getJSONObject(name)
    }

    fun isSafe(rel: String): Boolean =
        rel.isNotEmpty() && !rel.startsWith("/") && !rel.contains('\\') &&
            rel.split('/').none { it.isEmpty() || it == "." || it == ".." }

    /** Lowercase hex SHA-256 of [file], streamed: a model never has to fit in memory. */
    fun sha256(file: File): String {
        val digest = MessageDigest.getInstance("SHA-256")
        FileInputStream(file).use { input ->
            val buffer = ByteArray(1 shl 20)
            while (true) {
                val n = input.read(buffer)
                if (n < 0) break
                digest.update(buffer, 0, n)
            }
        }
        return digest.digest().joinToString("") { "%02x".format(it.toInt() and 0xff) }
    }
}
