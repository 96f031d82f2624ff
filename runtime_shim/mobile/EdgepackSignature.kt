// Checks an edgepack bundle's model.sig (OpenSSF model-signing format, ECDSA P-256) with java.security.
// Plain JVM + org.json (built into Android), like EdgepackVerifier.kt.
//
// model.sig is a Sigstore bundle whose DSSE envelope holds an in-toto statement listing every file of the
// bundle with its SHA-256, manifest.json included. Once the signature verifies and the statement equals the
// manifest's digests (plus manifest.json's own), EdgepackVerifier.verify ties every other byte to the
// manifest: together they cover the whole bundle. Refused, each as one "signature: ..." problem:
//   no model.sig, another key (the key hint differs), a signature that does not verify (tampered), and a
//   statement that differs from the bundle (a file changed since signing, even under a re-computed manifest).
package ai.edgepack

import org.json.JSONObject
import java.io.File
import java.security.KeyFactory
import java.security.MessageDigest
import java.security.Signature
import java.security.interfaces.ECPublicKey
import java.security.spec.X509EncodedKeySpec
import java.util.Base64

object EdgepackSignature {
    const val SIGNATURE = EdgepackVerifier.SIGNATURE
    private const val BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
    private const val PAYLOAD_TYPE = "application/vnd.in-toto+json"
    private const val PREDICATE_TYPE = "https://model_signing/signature/v1.0"
    private val P256_ORDER = java.math.BigInteger("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)

    /** The key's fingerprint once model.sig of [bundle] is signed by [publicKeyPem] over the bundle's files;
     *  otherwise a [BundleVerificationException]. Call before [EdgepackVerifier.verify], before any loading. */
    fun verify(bundle: File, publicKeyPem: String): String {
        val (key, fingerprint) = readKey(publicKeyPem)
        val file = File(bundle, SIGNATURE)
        if (!file.isFile) refuse("the bundle is not signed (no $SIGNATURE) and a signature by key $fingerprint is required")
        val payload: ByteArray
        val signature: ByteArray
        try {
            val document = JSONObject(file.readText(Charsets.UTF_8))
            val envelope = document.getJSONObject("dsseEnvelope")
            val signatures = envelope.getJSONArray("signatures")
            if (document.getString("mediaType") != BUNDLE_MEDIA_TYPE || envelope.getString("payloadType") != PAYLOAD_TYPE ||
                signatures.length() != 1) refuse("$SIGNATURE is not a model-signing key signature")
            val hint = document.getJSONObject("verificationMaterial").optJSONObject("publicKey")?.optString("hint", "") ?: ""
            if (hint.isNotEmpty() && hint != fingerprint) {
                refuse("signed with another key: $SIGNATURE names key $hint, the required key is $fingerprint")
            }
            payload = Base64.getDecoder().decode(envelope.getString("payload"))
            signature = Base64.getDecoder().decode(signatures.getJSONObject(0).getString("sig"))
        } catch (e: BundleVerificationException) {
            throw e
        } catch (e: Exception) {
            refuse("$SIGNATURE is malformed (${e.message})")
        }
        val verifier = Signature.getInstance("SHA256withECDSA")
        verifier.initVerify(key)
        verifier.update("DSSEv1 ${PAYLOAD_TYPE.length} $PAYLOAD_TYPE ${payload.size} ".toByteArray(Charsets.UTF_8))
        verifier.update(payload)
        val valid = try { verifier.verify(signature) } catch (e: java.security.SignatureException) { false }
        if (!valid) refuse("the signature does not verify with key $fingerprint (tampered, or signed with another key)")
        statementProblem(payload, bundleDigests(bundle))?.let { refuse(it) }
        return fingerprint
    }

    private fun refuse(problem: String): Nothing = throw BundleVerificationException(listOf("signature: $problem"))

    /** The P-256 key of a PEM SubjectPublicKeyInfo, and model-signing's fingerprint of it (SHA-256 of the PEM). */
    private fun readKey(pem: String): Pair<ECPublicKey, String> {
        val body = Regex("-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\\s]+)-----END PUBLIC KEY-----").find(pem)
            ?: refuse("the public key is not PEM (-----BEGIN PUBLIC KEY-----)")
        val key = try {
            val der = Base64.getDecoder().decode(body.groupValues[1].replace(Regex("\\s+"), ""))
            KeyFactory.getInstance("EC").generatePublic(X509EncodedKeySpec(der)) as ECPublicKey
        } catch (e: Exception) {
            refuse("the public key is not an EC key (${e.message})")
        }
        if (key.params.order != P256_ORDER) refuse("the public key is not a P-256 key")
        val lines = Base64.getEncoder().encodeToString(key.encoded).chunked(64).joinToString("") { it + "\n" }
        val canonical = "-----BEGIN PUBLIC KEY-----\n$lines-----END PUBLIC KEY-----\n"
        return key to hex(MessageDigest.getInstance("SHA-256").digest(canonical.toByteArray(Charsets.US_ASCII)))
    }

    /** manifest.json's SHA-256 and every file's SHA-256 as manifest.json lists it. */
    private fun bundleDigests(bundle: File): Map<String, String> {
        val manifest = File(bundle, EdgepackVerifier.MANIFEST)
        val files = try { JSONObject(manifest.readText(Charsets.UTF_8)).getJSONObject("files") }
            catch (e: Exception) { refuse("cannot read ${EdgepackVerifier.MANIFEST}: ${e.message}") }
        val digests = files.keys().asSequence().associateWith { files.getJSONObject(it).optString("sha256") }.toMutableMap()
        digests[EdgepackVerifier.MANIFEST] = EdgepackVerifier.sha256(manifest)
        return digests
    }

    private fun statementProblem(payload: ByteArray, digests: Map<String, String>): String? {
        val listed = mutableMapOf<String, String>()
        try {
            val statement = JSONObject(String(payload, Charsets.UTF_8))
            if (statement.getString("predicateType") != PREDICATE_TYPE) return "the signed statement is not a model-signing v1.0 statement"
            val predicate = statement.getJSONObject("predicate")
            val serialization = predicate.getJSONObject("serialization")
            if (serialization.getString("method") != "files" || serialization.getString("hash_type") != "sha256") {
                return "only files/sha256 serialization is read"
            }
            val resources = predicate.getJSONArray("resources")
            val root = MessageDigest.getInstance("SHA-256")
            for (i in 0 until resources.length()) {
                val resource = resources.getJSONObject(i)
                val digest = resource.getString("digest")
                if (resource.getString("algorithm") != "sha256" || !Regex("[0-9a-f]{64}").matches(digest)) return "the signed statement is malformed"
                listed[resource.getString("name")] = digest
                root.update(digest.chunked(2).map { it.toInt(16).toByte() }.toByteArray())
            }
            val subject = statement.getJSONArray("subject").getJSONObject(0).getJSONObject("digest").getString("sha256")
            if (hex(root.digest()) != subject) return "the signed statement is inconsistent (its subject digest does not match its resources)"
        } catch (e: Exception) {
            return "the signed statement is malformed (${e.message})"
        }
        val found = linkedMapOf(
            "not signed" to digests.keys.filter { it !in listed }.sorted(),
            "signed but not in the bundle" to listed.keys.filter { it !in digests }.sorted(),
            "changed since signing" to digests.keys.filter { it in listed && listed[it] != digests[it] }.sorted()
        )
        return found.filterValues { it.isNotEmpty() }.entries.joinToString("; ") { "${it.key}: ${it.value.joinToString(", ")}" }
            .ifEmpty { null }
    }

    private fun hex(bytes: ByteArray): String = bytes.joinToString("") { "%02x".format(it.toInt() and 0xff) }
}
