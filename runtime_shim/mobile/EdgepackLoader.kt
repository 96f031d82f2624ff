// Loads an edgepack bundle in an Android app with onnxruntime-android (coordinates in README.md).
//
//   val session = EdgepackLoader.createSession(OrtEnvironment.getEnvironment(), bundleDir)
//   val session = EdgepackLoader.createSession(env, bundleDir, publicKeyPem = SIGNER_PUBLIC_KEY)  // signed bundles
//   val rec = EdgepackLoader.createSession(env, bundleDir, modelName = "rec")  // a model of a multi-model bundle
//
// bundleDir must be a folder of real files (copy the bundle out of the APK's assets into
// context.filesDir first: assets are compressed entries, not files). Every file is checked against
// manifest.json (EdgepackVerifier.kt) before the session is created; a changed, missing or extra file
// throws BundleVerificationException and no model is loaded. With publicKeyPem (the signer's P-256 key,
// pinned in the app), model.sig must be signed by that key over every file (EdgepackSignature.kt), first.
package ai.edgepack

import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.providers.NNAPIFlags
import org.json.JSONObject
import java.io.File
import java.util.EnumSet

object EdgepackLoader {
    const val SESSION_OPTIONS = "session_options.json"

    fun createSession(
        env: OrtEnvironment,
        bundle: File,
        publicKeyPem: String? = null,
        modelName: String? = null,
    ): OrtSession {
        if (publicKeyPem != null) EdgepackSignature.verify(bundle, publicKeyPem)
        val manifest = EdgepackVerifier.verify(bundle) // every file, whichever model is opened
        val entry = EdgepackVerifier.modelEntry(manifest, modelName)
        val settings = JSONObject(File(bundle, SESSION_OPTIONS).readText(Charsets.UTF_8))
        val options = OrtSession.SessionOptions()
        options.setIntraOpNumThreads(settings.optInt("intra_op_num_threads", 0))
        options.setOptimizationLevel(
            when (settings.optString("graph_optimization_level", "all")) {
                "disable" -> OrtSession.SessionOptions.OptLevel.NO_OPT
                "basic" -> OrtSession.SessionOptions.OptLevel.BASIC_OPT
                "extended" -> OrtSession.SessionOptions.OptLevel.EXTENDED_OPT
                else -> OrtSession.SessionOptions.OptLevel.ALL_OPT
            }
        )
        // includes session.load_model_format=ORT and session.enable_saved_runtime_optimizations=1
        val entries = entry.optJSONObject("config_entries") ?: settings.getJSONObject("config_entries")
        for (key in entries.keys()) options.addConfigEntry(key, entries.getString(key))
        val providers = settings.getJSONArray("execution_providers")
        for (i in 0 until providers.length()) {
            val provider = providers.getJSONObject(i)
            when (val name = provider.getString("name")) {
                "NnapiExecutionProvider" -> options.addNnapi(nnapiFlags(provider.optJSONObject("options")))
                "XnnpackExecutionProvider" -> options.addXnnpack(stringOptions(provider.optJSONObject("options")))
                "CPUExecutionProvider" -> Unit // always there, after the others
                else -> throw IllegalArgumentException("$SESSION_OPTIONS names $name, which this loader cannot add")
            }
        }
        val model = File(bundle, entry.getString("file"))
        return env.createSession(model.path, options)
    }

    private fun stringOptions(options: JSONObject?): Map<String, String> =
        options?.keys()?.asSequence()?.associateWith { options.getString(it) } ?: emptyMap()

    private fun nnapiFlags(options: JSONObject?): EnumSet<NNAPIFlags> {
        val flags = EnumSet.noneOf(NNAPIFlags::class.java)
        val names = options?.optJSONArray("flags") ?: return flags
        for (i in 0 until names.length()) flags.add(NNAPIFlags.valueOf(names.getString(i).removePrefix("NNAPI_FLAG_")))
        return flags
    }
}
