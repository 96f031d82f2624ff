/**
 * edgepack.mjs: load an edgepack web bundle and run its model in the browser with onnxruntime-web.
 *
 *   import { load, clearCache, events } from './edgepack.mjs';
 *   const model = await load({ onProgress: ({ file, loaded, total, source }) => console.log(file, loaded, total, source) });
 *   const outputs = await model.run({ image: { data: new Float32Array(3 * 32 * 32), dims: [1, 3, 32, 32] } });
 *   console.log(outputs.logits.data, model.backend, model.threads, model.verification, model.sources);
 *   // a multi-model bundle: load() opens the first model (or options.model), session(name) any other
 *   const rec = await model.session('rec');   // model.models lists the names
 *
 * What it checks, in order:
 * 1. The page is served over http(s): browsers refuse modules, fetches and threads from file:// pages.
 * 2. manifest.json is fetched (with options.manifestIntegrity, if given, as its Subresource Integrity)
 *    and must list every file this loader needs with a well-formed sha384 integrity. A malformed
 *    integrity is refused here, because browsers treat one as "no check at all", and so is a manifest whose
 *    own checksum (manifest_sha256) no longer matches its bytes. When the server cannot
 *    be reached, the last manifest this page loaded from that URL is used (offline second visit).
 *    With options.publicKey, model.sig must be a model-signing signature by that ECDSA P-256 key
 *    (WebCrypto) over these very manifest bytes and the manifest-listed digests (verifySignature below),
 *    before any other file is fetched.
 * 3. Every file (onnxruntime-web's JavaScript and WebAssembly, the model, its external data) must
 *    match its sha384 integrity in the manifest, on one of two paths (`model.verification` says which):
 *    - 'sri': fetch(url, {integrity}), so the browser checks it (and hands the body over only then);
 *    - 'hash', for browsers without integrity on fetch(): the body streams in and is hashed with
 *      crypto.subtle before use.
 *    The WebAssembly, on both paths, is compiled while it streams in (compiling runs none of it) and
 *    hashed with crypto.subtle, block by block as it arrives where the manifest lists its 4 MiB blocks'
 *    digests, else whole once it is in; it is instantiated only if every digest matched. With integrity on
 *    fetch() the browser would hold its body until verified, so compiling could not start before the
 *    last byte: that cost a cold load some 150 ms more than onnxruntime-web fetching it itself.
 *    A refusal names the file and says why (HTTP status, network, or expected and actual digests).
 * 4. Verified files are kept in the Cache API (cache 'edgepack') under their sha384: a second visit
 *    takes them from there with no network, and from there the WebAssembly goes to onnxruntime-web as a
 *    response, so that the browser compiles it with WebAssembly.instantiateStreaming and reuses its
 *    compiled code. Entries were verified when stored: a read checks their size (a shorter or longer
 *    copy is fetched again), and once the page is idle their content is hashed again; a copy that no
 *    longer matches is deleted and fetched again, with a 'cache-damaged' event. An entry no manifest
 *    lists any more is deleted when a new version of its bundle loads. clearCache() empties the cache.
 * 5. Only verified bytes reach onnxruntime-web: its module is imported from a blob: URL of the
 *    verified bytes, the model as bytes and its external data as externalData entries whose path is
 *    the initializer's location.
 * 6. Threads need a crossOriginIsolated page (COOP/COEP headers): then the wasm backend runs the
 *    profile's thread count; without one it runs one thread and says so once per page (console and a
 *    'not-isolated' event on `events`) and in every result's warnings.
 * 7. The manifest's execution providers are tried in order (e.g. webgpu, then wasm); the result
 *    says which one runs and why the ones before it did not. An FP16 or q4f16 model skips webgpu when the
 *    GPU adapter lacks the 'shader-f16' feature: onnxruntime-web would create the session and then
 *    fail on the first run.
 * 8. onnxruntime-web returns tensors only: an output that is a sequence or a map (ZipMap's, as skl2onnx
 *    writes classifiers) is not fetched; `outputs` lists the tensor outputs run() returns, and the
 *    result's warnings name the others.
 *
 * It depends only on the browser and the onnxruntime-web files in this bundle's ort/ folder.
 */

const SRI = /^sha384-[A-Za-z0-9+/]{64}$/;
const SCHEMA = 'edgepack.manifest/1';
const CACHE_NAME = 'edgepack';
// Cache API keys are URLs: content entries and per-bundle manifest records live under this path of the bundle's origin.
const CACHE_PATH = '/.edgepack-cache/';
// Set in localStorage once the cache holds files: a first visit then neither opens nor searches the cache,
// which costs some 40 ms in a fresh browser profile before the first download could start.
const CACHE_HINT = 'edgepack.cache';

/** Typed arrays onnxruntime-web takes for each tensor type of the manifest's dtypes. */
const DTYPES = {
  float32: [Float32Array, 'float32'],
  float64: [Float64Array, 'float64'],
  int8: [Int8Array, 'int8'],
  uint8: [Uint8Array, 'uint8'],
  int16: [Int16Array, 'int16'],
  uint16: [Uint16Array, 'uint16'],
  int32: [Int32Array, 'int32'],
  uint32: [Uint32Array, 'uint32'],
  int64: [BigInt64Array, 'int64'],
  uint64: [BigUint64Array, 'uint64'],
  bool: [Uint8Array, 'bool'],
  float16: [Uint16Array, 'float16'],
  object: [Array, 'string'],  // an ONNX string tensor: a plain array of strings
};

const GRAPH_OPTIMIZATION = { disable: 'disabled', basic: 'basic', extended: 'extended', all: 'all' };

const NOT_ISOLATED = 'the page is not crossOriginIsolated, so onnxruntime-web runs on one thread; serve it with ' +
  '"Cross-Origin-Opener-Policy: same-origin" and "Cross-Origin-Embedder-Policy: require-corp" (see README.md)';

/** A problem with the bundle, the page or the inputs; `file` names the bundle file concerned, if any. */
export class EdgepackError extends Error {
  constructor(message, { file = null, hint = null, cause } = {}) {
    super((file ? `${file}: ` : '') + message + (hint ? `\n  hint: ${hint}` : ''), { cause });
    this.name = 'EdgepackError';
    this.file = file;
    this.hint = hint;
  }
}

/** Page-wide notices: 'not-isolated' (detail: {message, threads}) once per page; 'cache-damaged' (detail: {file, message}). */
export const events = new EventTarget();
let isolationNoticed = false;
let hashPathNoticed = false;

/** Delete every file this loader has cached for this origin; true if there was a cache to delete. */
export async function clearCache() {
  setHint(false);
  return globalThis.caches ? caches.delete(CACHE_NAME) : false;
}

/** Whether this origin's cache may hold files: the hint in localStorage, else (no localStorage) the Cache API. */
async function mayBeCached() {
  if (!globalThis.caches || !globalThis.crypto?.subtle) return false;
  try {
    return localStorage.getItem(CACHE_HINT) !== null;
  } catch {
    return caches.has(CACHE_NAME).catch(() => false);
  }
}

function setHint(cached) {
  try {
    if (cached) localStorage.setItem(CACHE_HINT, '1');
    else localStorage.removeItem(CACHE_HINT);
  } catch {
    // no localStorage (blocked, or an opaque origin): mayBeCached asks the Cache API itself
  }
}

// One onnxruntime-web instance per runtime: its WebAssembly is initialized once per page.
const runtimes = new Map();

/**
 * Load the bundle and create an inference session.
 * @param {object} [options]
 * @param {string|URL} [options.baseUrl] the bundle folder (default: the folder of this module)
 * @param {string} [options.manifestIntegrity] 'sha384-...' of manifest.json, to pin the manifest itself
 * @param {string|CryptoKey} [options.publicKey] the signer's P-256 public key (PEM, or a CryptoKey for ECDSA
 *   P-256 verify): the bundle must then carry model.sig signed with it
 * @param {(p: {file: string, loaded: number, total: number, source: string}) => void} [options.onProgress]
 *   per-file progress; source is 'network' or 'cache'
 * @param {string} [options.model] which model of a multi-model bundle to open (default: the first)
 */
export async function load(options = {}) {
  const started = performance.now();
  const base = new URL(options.baseUrl ?? './', import.meta.url);
  if (!base.pathname.endsWith('/')) base.pathname += '/';
  if (base.protocol === 'file:' || globalThis.location?.protocol === 'file:') {
    throw new EdgepackError('the bundle was opened from a file:// URL, where browsers block module imports, fetches and threads', {
      hint: 'serve the bundle folder over HTTP, e.g. `edgepack serve BUNDLE` (it also sends the COOP/COEP headers for threads)',
    });
  }
  const warnings = [];
  const verification = verificationPath();
  const files = new VerifiedFiles(base, verification, warnings, options.onProgress ?? (() => {}));
  const { manifest, bytes: manifestBytes } = await fetchManifest(files, options.manifestIntegrity);
  files.manifest = manifest;
  const signedBy = options.publicKey ? await verifySignature(files, manifest, manifestBytes, options.publicKey) : null;
  const web = manifest.profile?.web;
  if (!web?.entry || !Array.isArray(web.ort_web_files)) {
    throw new EdgepackError('profile.web (the onnxruntime-web files of this bundle) is missing', { file: 'manifest.json' });
  }
  const wasmName = web.ort_web_files.find((name) => name.endsWith('.wasm'));
  const runtimeFiles = { entry: `ort/${web.entry}`, wasm: `ort/${wasmName}` };
  const view = modelView(manifest, options.model ?? null);
  for (const rel of [runtimeFiles.entry, runtimeFiles.wasm, view.model.file, ...(view.model.external_data ?? [])]) files.entry(rel);
  if (globalThis.crypto?.subtle && !(await sealMatches(manifestBytes))) {
    throw new EdgepackError('refused: its content does not match its own manifest_sha256', {
      file: 'manifest.json',
      hint: 'the manifest was altered or damaged after packaging; upload the bundle again',
    });
  }
  // Keyed by every digest the WebAssembly was verified against: its blocks' too, which it is checked by here.
  const wasmEntry = files.entry(runtimeFiles.wasm);
  const key = `${files.entry(runtimeFiles.entry).integrity} ${wasmEntry.integrity} ${JSON.stringify(wasmEntry.blocks ?? null)}`;
  const isolated = globalThis.crossOriginIsolated === true;
  const start = () => {
    if (!runtimes.has(key)) runtimes.set(key, startRuntime(files, runtimeFiles, threadsFor(manifest, isolated)));
    return runtimes.get(key);
  };
  start();
  // A runtime that failed to start is started again by the next session().
  const runtime = () => start().catch((error) => { runtimes.delete(key); throw error; });
  const shared = { files, manifest, manifestBytes, signedBy, isolated, verification, runtime, warnings };
  const first = await openModel(shared, view, started);
  const models = modelNames(manifest);
  return {
    ...first,
    /** The names of the bundle's models (one, unless it is a multi-model bundle). */
    models,
    /** Open another model of this bundle by name, verified like the first, on the same onnxruntime-web. */
    async session(name) {
      return openModel(shared, modelView(manifest, name), performance.now());
    },
  };
}

/** The names of the bundle's models: those of `models` (a multi-model bundle), else its one model's file name. */
function modelNames(manifest) {
  if (manifest.models && typeof manifest.models === 'object') return Object.keys(manifest.models);
  const file = manifest.model.file;
  return [file.split('/').pop().replace(/\.[^.]*$/, '')];
}

/** The manifest as seen by one model of it (null: the first): its `model` and its session config entries. */
function modelView(manifest, name) {
  if (name === null) return manifest;
  const names = modelNames(manifest);
  if (!names.includes(name)) {
    throw new EdgepackError(`this bundle has no model ${JSON.stringify(name)}; it holds: ${names.join(', ')}`, { file: 'manifest.json' });
  }
  const entry = manifest.models?.[name];
  if (!entry) return manifest;
  const { config_entries: configEntries, stages: _stages, ...model } = entry;
  const settings = { ...(manifest.runtime.session_options ?? {}) };
  if (configEntries) settings.config_entries = configEntries;
  return { ...manifest, model, runtime: { ...manifest.runtime, session_options: settings } };
}

/** Fetch (verified) and open one model of the bundle: `view` is the manifest as that model sees it. */
async function openModel(shared, view, started) {
  const { files, manifestBytes, signedBy, isolated, verification } = shared;
  const modelFile = view.model.file;
  const modelDir = modelFile.slice(0, modelFile.lastIndexOf('/') + 1);
  const dataFiles = view.model.external_data ?? [];
  for (const rel of [modelFile, ...dataFiles]) files.entry(rel);
  const warnings = [];
  const [runtime, modelBytes, ...dataBytes] = await Promise.all([
    shared.runtime(),
    files.bytes(modelFile),
    ...dataFiles.map((rel) => files.bytes(rel)),
  ]);
  const { ort } = runtime;
  const fetched = performance.now();
  warnings.push(...shared.warnings);  // the page's (no offline cache), now that the files are in

  const threads = ort.env.wasm.numThreads;
  if (!isolated) {
    warnings.push(NOT_ISOLATED);
    if (!isolationNoticed) {
      isolationNoticed = true;
      console.warn(`edgepack: ${NOT_ISOLATED}`);
      events.dispatchEvent(new CustomEvent('not-isolated', { detail: { message: NOT_ISOLATED, threads } }));
    }
  }
  const settings = view.runtime.session_options ?? {};
  const sessionOptions = {
    graphOptimizationLevel: GRAPH_OPTIMIZATION[settings.graph_optimization_level] ?? 'all',
    extra: { ...(settings.config_entries ?? {}) },
    externalData: dataFiles.map((rel, i) => ({ path: rel.slice(modelDir.length), data: dataBytes[i] })),
  };
  const { session, backend, fallbacks } = await runtime.initializing(() => createSession(ort, modelBytes, sessionOptions, view));
  for (const { backend: name, error } of fallbacks) warnings.push(`${name} is not available (${error}); running on ${backend}`);
  // onnxruntime-web returns tensors only: a sequence or map output (ZipMap's) is not fetched; run() returns the others.
  const declared = view.model.outputs;
  const outputs = declared.filter((o) => !String(o.dtype).endsWith('_type'));
  const fetches = outputs.map(({ name }) => name);
  for (const o of declared.filter((spec) => !outputs.includes(spec))) {
    warnings.push(`output ${o.name} is a ${o.dtype.replace(/_type$/, '')}, which onnxruntime-web cannot return: run() leaves it out`);
  }
  // Written once the page is idle, so that the first visit's disk writes do not slow its first inference down.
  const cached = whenIdle().then(() => files.commit(manifestBytes));
  for (const warning of warnings) if (warning !== NOT_ISOLATED) console.warn(`edgepack: ${warning}`);
  const ready = performance.now();

  const inputs = view.model.inputs;
  return {
    inputs,
    outputs,
    backend,
    fallbacks,
    threads,
    crossOriginIsolated: isolated,
    verification,
    sources: files.sources,
    /** Resolves once the files are in the offline cache (it never rejects: a failed write only costs the next visit a download). */
    cached,
    warnings,
    manifest: view,
    signedBy,
    ort,
    timings: { fetchMs: fetched - started, sessionMs: ready - fetched, loadMs: ready - started },
    /** Run the model. feeds: {name: {data, dims}} or onnxruntime-web Tensors; returns {name: Tensor} (data, dims, type). */
    async run(feeds) {
      const tensors = toTensors(ort, inputs, feeds);
      const results = await session.run(tensors, fetches);
      return Object.fromEntries(outputs.map(({ name }) => [name, results[name]]));
    },
    async dispose() {
      await session.release();
    },
  };
}

/** 'sri' where fetch() takes an integrity, else 'hash' where crypto.subtle can hash; otherwise nothing can be verified. */
function verificationPath() {
  if (typeof Request !== 'undefined' && 'integrity' in Request.prototype) return 'sri';
  if (globalThis.crypto?.subtle) {
    if (!hashPathNoticed) console.info('edgepack: this browser has no integrity on fetch(): files are verified with crypto.subtle');
    hashPathNoticed = true;
    return 'hash';
  }
  throw new EdgepackError('this browser can neither check integrity on fetch() nor hash with crypto.subtle, so the bundle cannot be verified', {
    hint: 'serve the page over https (crypto.subtle exists only in secure contexts), or use a current browser',
  });
}

/** The Cache API cache, or null (it exists only in secure contexts, and storage can be blocked): then every visit uses the network. */
async function openStore(report) {
  // Without crypto.subtle cached copies could not be hashed again: no cache then (plain-http pages have neither).
  if (!globalThis.caches || !globalThis.crypto?.subtle) return null;
  try {
    return await caches.open(CACHE_NAME);
  } catch (error) {
    report(`the Cache API is not usable here (${error.message}): files are fetched on every visit`);
    return null;
  }
}

async function fetchManifest(files, manifestIntegrity) {
  if (manifestIntegrity !== undefined && !SRI.test(manifestIntegrity)) {
    throw new EdgepackError(`options.manifestIntegrity must look like 'sha384-' + 64 base64 characters, got ${JSON.stringify(manifestIntegrity)}`);
  }
  // A pinned manifest is content-addressed like every other file, so the cache answers without the network.
  const bytes = manifestIntegrity
    ? await files.bytes('manifest.json', { integrity: manifestIntegrity, source: 'options.manifestIntegrity' })
    : await files.latest('manifest.json');
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(bytes));
  } catch (error) {
    throw new EdgepackError(`not valid JSON (${error.message}): the file is damaged`, { file: 'manifest.json', hint: 'package the model again' });
  }
  if (manifest?.schema !== SCHEMA || typeof manifest.files !== 'object' || !manifest.model || !manifest.runtime) {
    throw new EdgepackError(`not an edgepack manifest (expected schema ${SCHEMA})`, { file: 'manifest.json' });
  }
  return { manifest, bytes };
}

/**
 * The bundle's files, each verified against its integrity in the manifest: from the cache if it holds a
 * copy of the right size (see fromCache), else from the network (and then stored in the cache).
 */
class VerifiedFiles {
  /** `warnings`: the load's, for a cache that cannot be opened. */
  constructor(base, verification, warnings, onProgress) {
    this.base = base;
    this.verification = verification;
    this.warnings = warnings;
    this.opened = null;
    // What reads look in, opened while the manifest is fetched: nothing when this origin has not cached yet.
    this.stored = mayBeCached().then((yes) => (yes ? this.store() : null));
    this.onProgress = onProgress;
    this.manifest = null;
    this.sources = {};
    this.writes = [];
    this.reported = {};
    this.fromCacheEntries = [];
    this.latestBytes = {};
  }

  entry(rel) {
    const entry = this.manifest.files[rel];
    if (!entry) throw new EdgepackError(`manifest.json does not list ${rel}, which this bundle needs`, { file: rel });
    if (typeof entry.integrity !== 'string' || !SRI.test(entry.integrity) || !Number.isInteger(entry.size)) {
      throw new EdgepackError(`its integrity in manifest.json is malformed (${JSON.stringify(entry.integrity)}): manifest.json is damaged`, {
        file: rel,
        hint: 'package the model again',
      });
    }
    return entry;
  }

  /** The verified bytes of `rel`. */
  async bytes(rel, entry = this.entry(rel)) {
    const cached = await this.fromCache(rel, entry, false);
    return cached ? cached.bytes : this.download(rel, entry);
  }

  /** The verified bytes of `rel` from the network (kept for the cache). */
  async download(rel, entry = this.entry(rel)) {
    if (this.verification === 'hash') {
      const bytes = await hashedFetch(new URL(rel, this.base), rel, entry, (loaded) => this.progress(rel, loaded, entry.size));
      this.keep(entry, cacheable(rel, bytes));
      this.sources[rel] = 'network';
      return bytes;
    }
    const response = await this.fetchWithIntegrity(rel, entry);
    // Not response.clone(): teeing a 14 MB body cost about 50 ms; the cache entry copies the bytes instead.
    const bytes = new Uint8Array(await response.arrayBuffer());
    this.keep(entry, cacheable(rel, bytes));
    return bytes;
  }

  /**
   * The WebAssembly `rel`: {response} from the cache, its body unread, for WebAssembly.instantiateStreaming
   * (which then uses the compiled code Chromium keeps with the Cache API entry), else {bytes, module} from
   * the network (compiled()). Measured in headless Chromium (14 MB wasm, session creation on a reload): a
   * cached response 100-240 ms, onnxruntime-web fetching it itself from the HTTP cache 200-360 ms, bytes
   * 150-390 ms, and a fetch(url, {integrity}) response handed to instantiateStreaming 600-900 ms.
   */
  async wasm(rel, entry = this.entry(rel)) {
    const cached = await this.fromCache(rel, entry, true);
    if (cached) return { response: cached.response };
    return this.compiled(rel, entry);
  }

  /**
   * The WebAssembly from the network, compiled while it streams in and hashed once it is in: {bytes, module}.
   * Compiling runs none of its code; the module is instantiated only after the digest matched.
   */
  async compiled(rel, entry) {
    // Plain-http pages have no crypto.subtle: there the browser's integrity check is the only one.
    if (!globalThis.crypto?.subtle) return { bytes: await this.download(rel, entry) };
    const url = new URL(rel, this.base);
    // Aborted when the file is refused, so that the compile of the other copy stops downloading too.
    const download = new AbortController();
    try {
      return await this.compiledFrom(url, rel, entry, download.signal);
    } catch (error) {
      download.abort();
      throw error;
    }
  }

  async compiledFrom(url, rel, entry, signal) {
    let response;
    try {
      response = await fetch(url, { signal });
    } catch (error) {
      throw networkError(url, rel, error);
    }
    if (!response.ok) throw httpError(response, rel);
    const module = compileWhileStreaming(response);
    // Hashed block by block as it streams in where the manifest lists its blocks, else whole once it is in.
    const blocks = blockDigests(entry);
    const digests = [];
    let hashed = 0;
    let bytes;
    try {
      bytes = await readBody(response, rel, entry, (loaded, buffer) => {
        this.progress(rel, loaded, entry.size);
        for (; blocks && loaded - hashed >= blocks.size; hashed += blocks.size) digests.push(base64Digest(buffer.subarray(hashed, hashed + blocks.size)));
      });
    } catch (error) {
      if (error instanceof EdgepackError) throw error;
      throw networkError(url, rel, error);
    }
    let matches;
    if (blocks) {
      if (hashed < bytes.byteLength) digests.push(base64Digest(bytes.subarray(hashed)));
      const found = await Promise.all(digests);
      matches = found.length === blocks.sha384.length && found.every((digest, i) => digest === blocks.sha384[i]);
    } else {
      matches = (await sri(bytes)) === entry.integrity;
    }
    if (!matches) throw refusal(rel, entry, await sri(bytes), bytes.byteLength);
    // The cache is keyed by the whole file's integrity: checked too before the copy is stored (off the load's path).
    this.keep(entry, cacheable(rel, bytes), blocks ? bytes : null);
    this.sources[rel] = 'network';
    return { bytes, module };
  }

  async fetchWithIntegrity(rel, entry) {
    const url = new URL(rel, this.base);
    // The browser releases the body only once it is verified: progress goes from 0 to the total.
    this.progress(rel, 0, entry.size);
    let response;
    try {
      response = await fetch(url, { integrity: entry.integrity });
    } catch (error) {
      throw await explainRefusal(url, rel, entry, error);
    }
    if (!response.ok) throw httpError(response, rel);
    this.progress(rel, entry.size, entry.size);
    this.sources[rel] = 'network';
    return response;
  }

  /**
   * The cached copy of `entry`: {bytes}, or with `unread` {response} whose body is still unread. Entries
   * were verified when stored and are keyed by their digest, so only their size is checked here (a
   * cached blob's size costs no read); their content is hashed again after the load, by checkCached().
   * A pinned manifest has no recorded size: it is hashed now (it is a few KB).
   */
  async fromCache(rel, entry, unread) {
    const store = await this.stored;
    if (!store) return null;
    const key = this.contentKey(entry);
    try {
      const blob = await store.match(key).then((r) => r?.blob());
      if (!blob) return null;
      if (entry.size === undefined ? (await sri(await blob.arrayBuffer())) === entry.integrity : blob.size === entry.size) {
        const response = unread ? await store.match(key) : null;
        if (!unread || response) {
          this.progress(rel, blob.size, entry.size, 'cache');
          this.sources[rel] = 'cache';
          this.fromCacheEntries.push([rel, entry]);
          return unread ? { response } : { bytes: new Uint8Array(await blob.arrayBuffer()) };
        }
      }
    } catch (error) {
      console.warn(`edgepack: ${rel}: cannot read its cached copy (${error.message}); fetching it again`);
      return null;
    }
    await this.damaged(store, rel, entry);
    return null;
  }

  async damaged(store, rel, entry) {
    const message = `${rel}: its cached copy no longer matches ${entry.integrity}; it was deleted`;
    console.warn(`edgepack: ${message}`);
    events.dispatchEvent(new CustomEvent('cache-damaged', { detail: { file: rel, message } }));
    await store.delete(this.contentKey(entry));
  }

  /**
   * Hash again what this visit read from the cache, once the page is idle: a copy that no longer matches
   * (a disk error, or another script of the site writing to the cache) is deleted and fetched again, and
   * a 'cache-damaged' event tells the page, whose model then ran on it (reload it). Re-hashing before use
   * would not stop an attacker (whoever can write this origin's cache can also replace crypto.subtle),
   * and it cost the 14 MB WebAssembly 70-200 ms per visit on a busy two-core machine.
   */
  async checkCached(store) {
    await whenIdle();
    for (const [rel, entry] of this.fromCacheEntries) {
      const response = await store.match(this.contentKey(entry));
      if (response && (await sri(await response.arrayBuffer())) === entry.integrity) continue;
      await this.damaged(store, rel, entry);
      const url = new URL(rel, this.base);
      try {
        const bytes = this.verification === 'hash'
          ? await hashedFetch(url, rel, entry, () => {})
          : new Uint8Array(await (await fetch(url, { integrity: entry.integrity })).arrayBuffer());
        await store.put(this.contentKey(entry), cacheable(rel, bytes));
      } catch {
        // unreachable or refused: the next visit fetches it
      }
    }
  }

  /**
   * manifest.json or model.sig from the network, or, when the server cannot be reached, the last copy this
   * page loaded from its URL (recorded at commit()).
   */
  async latest(rel) {
    const url = new URL(rel, this.base);
    let response;
    try {
      response = await fetch(url);
    } catch (error) {
      // Whatever the hint says (a site may have cleared localStorage alone): the server is unreachable anyway,
      // and the bundle's other files are then looked for in the cache too.
      const store = await this.store();
      const cached = await store?.match(this.recordKey(rel));
      if (!cached) throw networkError(url, rel, error);
      this.stored = Promise.resolve(store);
      this.sources[rel] = 'cache';
      return new Uint8Array(await cached.arrayBuffer());
    }
    if (!response.ok) throw httpError(response, rel);
    const bytes = new Uint8Array(await response.arrayBuffer());
    this.sources[rel] = 'network';
    this.latestBytes[rel] = bytes;
    return bytes;
  }

  progress(rel, loaded, total, source = 'network') {
    // A pinned manifest's size is not known in advance: only the manifest's files report progress.
    if (total === undefined) return;
    // At most one event per file per animation frame between its first and its last: a page that redraws on
    // each one would otherwise slow the download it shows (a 14 MB body comes in some 200 chunks).
    const now = performance.now();
    if (loaded !== 0 && loaded !== total && now - (this.reported[rel] ?? -Infinity) < 16) return;
    this.reported[rel] = now;
    this.onProgress({ file: rel, loaded, total, source });
  }

  /** Store a verified response in the cache, at commit(). */
  keep(entry, response, unchecked = null) {
    const whole = unchecked && (async () => (await sri(unchecked)) === entry.integrity);
    this.writes.push([this.contentKey(entry), response, whole]);
  }

  /** The Cache API cache, opened on first use, or null; `report` says why not (by default: in the load's warnings). */
  store(report = (message) => this.warnings.push(message)) {
    this.opened ??= openStore(report);
    return this.opened;
  }

  contentKey(entry) {
    return new URL(`${CACHE_PATH}${entry.integrity.replaceAll('/', '_').replaceAll('+', '-')}`, this.base.origin).href;
  }

  recordKey(rel = 'manifest.json') {
    return new URL(`${CACHE_PATH}bundle/${encodeURIComponent(new URL(rel, this.base).href)}`, this.base.origin).href;
  }

  /**
   * Once every file is verified: write them to the cache, record this manifest for offline visits,
   * delete the entries of files the bundle's previous manifest listed and no recorded manifest still
   * does, then checkCached(). A cache that cannot be written only costs the next visit its downloads,
   * so this never throws.
   */
  async commit(manifestBytes) {
    // Opened only now on a first visit, once the results are out: then a cache that cannot be used is said here.
    const store = await this.store((message) => console.warn(`edgepack: ${message}`));
    if (!store) return;
    try {
      const writes = this.writes.splice(0);  // a later model of the bundle commits only what it fetched
      await Promise.all(writes.map(async ([key, response, whole]) => {
        if (whole && !(await whole())) {
          console.warn(`edgepack: a file matched its blocks in manifest.json but not its integrity (${key}); it was not cached`);
          return;
        }
        await store.put(key, response);
      }));
      if (this.latestBytes['model.sig']) await store.put(this.recordKey('model.sig'), new Response(this.latestBytes['model.sig']));
      if (this.sources['manifest.json'] !== 'cache') await this.record(store, manifestBytes);
      setHint(true);
      await this.checkCached(store);
    } catch (error) {
      console.warn(`edgepack: could not update the cache (${error?.message ?? error}): the next visit downloads what is missing`);
    }
  }

  async record(store, manifestBytes) {
    const key = this.recordKey();
    const recorded = await store.match(key).then((r) => r?.text()).catch(() => undefined);
    if (recorded === new TextDecoder().decode(manifestBytes)) return;
    await store.put(key, new Response(manifestBytes, { headers: { 'Content-Type': 'application/json' } }));
    const previous = recorded === undefined ? null : JSON.parse(recorded);
    const listed = new Set(Object.values(this.manifest.files).map((e) => e.integrity));
    const stale = Object.values(previous?.files ?? {}).map((e) => e.integrity).filter((i) => !listed.has(i));
    if (!stale.length) return;
    // Bundles can share files (the same onnxruntime-web): keep what another recorded manifest lists.
    const records = new URL(`${CACHE_PATH}bundle/`, this.base.origin).href;
    for (const request of await store.keys()) {
      if (request.url === key || !request.url.startsWith(records)) continue;
      const other = await store.match(request).then((r) => r.json()).catch(() => null);
      for (const e of Object.values(other?.files ?? {})) listed.add(e.integrity);
    }
    await Promise.all(stale.filter((i) => !listed.has(i)).map((integrity) => store.delete(this.contentKey({ integrity }))));
  }
}

/** Resolves when the page is next idle (at most 2 s from now). */
function whenIdle() {
  return new Promise((resolve) => (globalThis.requestIdleCallback ? requestIdleCallback(resolve, { timeout: 2000 }) : setTimeout(resolve, 200)));
}

/** Verified bytes as a cache entry; the MIME type lets WebAssembly.instantiateStreaming take it. */
function cacheable(rel, bytes) {
  return new Response(bytes, { headers: { 'Content-Type': rel.endsWith('.wasm') ? 'application/wasm' : 'application/octet-stream' } });
}

/** The 'hash' path: the body streams in with progress, then its SHA-384 and size must match. */
async function hashedFetch(url, rel, entry, onLoaded) {
  let bytes;
  try {
    const response = await fetch(url);
    if (!response.ok) throw httpError(response, rel);
    bytes = await readBody(response, rel, entry, onLoaded);
  } catch (error) {
    if (error instanceof EdgepackError) throw error;
    throw networkError(url, rel, error);
  }
  const actual = await sri(bytes);
  if (actual !== entry.integrity) throw refusal(rel, entry, actual, bytes.byteLength);
  return bytes;
}

function refusal(rel, entry, actual, length) {
  const expected = `${entry.integrity}${entry.size !== undefined ? `, ${entry.size} bytes` : ''}`;
  return new EdgepackError(`refused: its content does not match ${entry.source ?? 'manifest.json'} (expected ${expected}; got ${actual}, ${length} bytes)`, {
    file: rel,
    hint: 'the file was altered or damaged after packaging; upload the bundle again',
  });
}

function tooLong(rel, entry) {
  return new EdgepackError(`refused: longer than the ${entry.size} bytes ${entry.source ?? 'manifest.json'} records`, { file: rel });
}

function networkError(url, rel, error) {
  return new EdgepackError(`cannot fetch ${url}: ${error.message}`, { file: rel, hint: 'is the server running?', cause: error });
}

async function readBody(response, rel, entry, onLoaded) {
  const size = entry.size;
  const reader = response.body.getReader();
  // With the size known up front the bytes go straight into one buffer: a large model is held once, not twice.
  let bytes = new Uint8Array(size ?? Number(response.headers.get('Content-Length') ?? 0));
  let loaded = 0;
  onLoaded(loaded);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.byteLength > bytes.byteLength) {
      if (size !== undefined) {
        await reader.cancel();
        throw tooLong(rel, entry);
      }
      const grown = new Uint8Array(Math.max(2 * bytes.byteLength, loaded + value.byteLength));
      grown.set(bytes.subarray(0, loaded));
      bytes = grown;
    }
    bytes.set(value, loaded);
    loaded += value.byteLength;
    onLoaded(loaded, bytes);
  }
  return loaded === bytes.byteLength ? bytes : bytes.slice(0, loaded);
}

function httpError(response, rel) {
  return new EdgepackError(`HTTP ${response.status} ${response.statusText} from ${response.url}`, {
    file: rel,
    hint: response.status === 404 ? 'upload every file of the bundle, keeping its folder layout' : undefined,
  });
}

/** fetch() with integrity says only "Failed to fetch": fetch again without it to tell a refusal from a network or HTTP error. */
async function explainRefusal(url, rel, entry, original) {
  let response;
  try {
    response = await fetch(url, { cache: 'no-store' });
  } catch {
    return networkError(url, rel, original);
  }
  if (!response.ok) return httpError(response, rel);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (entry.size !== undefined && bytes.byteLength > entry.size) return tooLong(rel, entry);
  return refusal(rel, entry, globalThis.crypto?.subtle ? await sri(bytes) : 'another digest', bytes.byteLength);
}

/**
 * A promise of the WebAssembly module compiled from a copy of `response` as it streams in, or of null where
 * that is not possible (no WebAssembly.compileStreaming, or compiling fails): onnxruntime-web then compiles
 * the verified bytes itself.
 */
function compileWhileStreaming(response) {
  if (typeof WebAssembly.compileStreaming !== 'function') return Promise.resolve(null);
  try {
    // From the response itself where its MIME type allows (a body re-wrapped in JavaScript streams slower).
    const copy = response.clone();
    const typed = copy.headers.get('Content-Type')?.split(';')[0].trim() === 'application/wasm';
    const source = typed ? copy : new Response(copy.body, { headers: { 'Content-Type': 'application/wasm' } });
    return WebAssembly.compileStreaming(source).catch(() => null);
  } catch {
    return Promise.resolve(null);
  }
}

/** The manifest's per-block SHA-384 digests of `entry` ({size, sha384}), or null: then the file is hashed whole. */
function blockDigests(entry) {
  const blocks = entry.blocks;
  const wellFormed = blocks && Number.isInteger(blocks.size) && blocks.size > 0 && Array.isArray(blocks.sha384) &&
    blocks.sha384.length === Math.ceil(entry.size / blocks.size) && blocks.sha384.every((d) => typeof d === 'string' && /^[A-Za-z0-9+/]{64}$/.test(d));
  return wellFormed ? blocks : null;
}

async function base64Digest(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(await crypto.subtle.digest('SHA-384', bytes))));
}

const SEAL = new TextEncoder().encode('"manifest_sha256": "');

/**
 * Whether manifest.json still has the checksum it was written with (as the Python shim checks it): the
 * SHA-256 of its bytes with the value of manifest_sha256 written as 64 zeros. A manifest changed anywhere,
 * in a file's digest or its blocks alike, is refused as a whole.
 */
async function sealMatches(bytes) {
  const starts = [];
  for (let i = bytes.indexOf(SEAL[0]); i !== -1; i = bytes.indexOf(SEAL[0], i + 1)) {
    if (SEAL.every((b, j) => bytes[i + j] === b)) starts.push(i + SEAL.length);
  }
  if (starts.length !== 1) return false;
  const [start] = starts;
  const found = new TextDecoder().decode(bytes.subarray(start, start + 64));
  if (!/^[0-9a-f]{64}$/.test(found) || bytes[start + 64] !== 0x22) return false;
  const blanked = bytes.slice();
  blanked.fill(0x30, start, start + 64);
  return (await sha256Hex(blanked)) === found;
}

async function sri(bytes) {
  return 'sha384-' + (await base64Digest(bytes));
}

function threadsFor(manifest, isolated) {
  if (!isolated) return 1;
  const wanted = manifest.runtime.session_options?.intra_op_num_threads ?? 0;
  if (wanted > 0) return wanted;
  // onnxruntime-web's own default, min(4, ceil(cores / 2)), gives one thread on two cores: take at least two.
  const cores = navigator.hardwareConcurrency || 1;
  return Math.min(cores, Math.max(2, Math.min(4, Math.ceil(cores / 2))));
}

/**
 * onnxruntime-web from verified files. Its WebAssembly is initialized inside the first session creation,
 * which runs under `initializing`. From the network the WebAssembly comes as bytes (env.wasm.wasmBinary);
 * from the cache onnxruntime-web is told its URL (env.wasm.wasmPaths) and, for that one URL, fetch()
 * answers with the verified cached response, so Emscripten compiles it with WebAssembly.instantiateStreaming.
 */
async function startRuntime(files, runtimeFiles, numThreads) {
  const code = await files.bytes(runtimeFiles.entry);
  // The blob: URL stays alive: onnxruntime-web starts its worker threads from its own module URL.
  const url = URL.createObjectURL(new Blob([code], { type: 'text/javascript' }));
  let ort;
  try {
    ort = await import(/* webpackIgnore: true */ /* @vite-ignore */ url);
  } catch (error) {
    throw new EdgepackError(`cannot import onnxruntime-web (${error.message})`, {
      file: runtimeFiles.entry,
      hint: "a Content-Security-Policy must allow blob: in script-src and worker-src, and 'wasm-unsafe-eval'",
      cause: error,
    });
  }
  ort.env.wasm.numThreads = numThreads;
  ort.env.wasm.proxy = false;
  // The WebAssembly only now: compiling it keeps every core busy, and an import beside it took up to ten
  // times longer (onnxruntime-web's WebGPU build: 40 ms alone, 480 ms beside its 27 MB WebAssembly).
  let { bytes, module, response } = await files.wasm(runtimeFiles.wasm);
  if (bytes) {
    ort.env.wasm.wasmBinary = bytes;
    let initialized = !module;
    return {
      ort,
      async initializing(create) {
        if (initialized) return create();
        const restore = answerInstantiate(bytes, await module);
        try {
          return await create();
        } finally {
          restore();
          initialized = true;
        }
      },
    };
  }
  const wasmUrl = new URL(runtimeFiles.wasm, files.base).href;
  ort.env.wasm.wasmPaths = { wasm: wasmUrl };
  let initialized = false;
  return {
    ort,
    async initializing(create) {
      if (initialized) return create();
      // Emscripten asks again (for bytes) only if streaming compilation failed: the cached copy is damaged
      // or was stored without its MIME type, so the second answer comes from the network, through the
      // page's own fetch().
      const restore = answerFetch(wasmUrl, async () => {
        if (response) {
          const first = response;
          response = null;
          return first;
        }
        restore();
        return new Response(await files.download(runtimeFiles.wasm));
      });
      try {
        return await create();
      } finally {
        restore();
        initialized = true;
        response = null;
      }
    },
  };
}

/**
 * Let onnxruntime-web's WebAssembly.instantiate() of the verified bytes (Emscripten passes a copy of
 * env.wasm.wasmBinary, so it is known by its length and sampled bytes) use `module`, compiled from them
 * already, until the returned function is called.
 */
function answerInstantiate(bytes, module) {
  const original = WebAssembly.instantiate;
  if (!module) return () => {};
  const hooked = function instantiate(source, imports) {
    if (!sameBytes(source, bytes)) return original.apply(this, arguments);
    WebAssembly.instantiate = original;
    return original.call(this, module, imports).then((instance) => ({ module, instance }));
  };
  WebAssembly.instantiate = hooked;
  return () => {
    if (WebAssembly.instantiate === hooked) WebAssembly.instantiate = original;
  };
}

/** Whether `source` (any BufferSource) is a copy of `bytes`: same length, and the same bytes at 64 places. */
function sameBytes(source, bytes) {
  if (source instanceof WebAssembly.Module || !source || source.byteLength !== bytes.byteLength) return false;
  let view;
  try {
    view = ArrayBuffer.isView(source) ? new Uint8Array(source.buffer, source.byteOffset, source.byteLength) : new Uint8Array(source);
  } catch {
    return false;
  }
  const step = Math.max(1, Math.floor(bytes.byteLength / 64));
  for (let i = 0; i < bytes.byteLength; i += step) if (view[i] !== bytes[i]) return false;
  return view[bytes.byteLength - 1] === bytes[bytes.byteLength - 1];
}

/** Let fetch() of exactly `url` be answered by `answer()` until the returned function is called; any other fetch is untouched. */
function answerFetch(url, answer) {
  const original = globalThis.fetch;
  const hooked = function fetch(input, init) {
    const requested = input instanceof Request ? input.url : String(input);
    return requested === url ? answer() : original.call(this, input, init);
  };
  globalThis.fetch = hooked;
  return () => {
    if (globalThis.fetch === hooked) globalThis.fetch = original;
  };
}

async function createSession(ort, modelBytes, sessionOptions, manifest) {
  const fallbacks = [];
  for (const provider of manifest.runtime.execution_providers) {
    const halfPrecision = ['fp16', 'q4f16'].includes(manifest.model.precision);
    const missing = provider.name === 'webgpu' && halfPrecision && !(await hasShaderF16());
    if (missing) {
      fallbacks.push({ backend: provider.name, error: `the GPU adapter has no 'shader-f16' feature, which this ${manifest.model.precision} model needs` });
      continue;
    }
    try {
      const session = await ort.InferenceSession.create(modelBytes, {
        ...sessionOptions,
        executionProviders: [{ ...(provider.options ?? {}), name: provider.name }],
      });
      return { session, backend: provider.name, fallbacks };
    } catch (error) {
      fallbacks.push({ backend: provider.name, error: String(error?.message ?? error).split('\n')[0] });
    }
  }
  throw new EdgepackError(
    `no execution provider could load the model: ${fallbacks.map((f) => `${f.backend}: ${f.error}`).join('; ')}`,
    { file: manifest.model.file },
  );
}

async function hasShaderF16() {
  try {
    const adapter = await globalThis.navigator?.gpu?.requestAdapter();
    return adapter?.features?.has('shader-f16') ?? true;  // no adapter: onnxruntime-web's own error says so
  } catch {
    return true;
  }
}

function toTensors(ort, inputs, feeds) {
  if (!feeds || typeof feeds !== 'object') throw new EdgepackError('run(feeds): feeds must be an object {inputName: {data, dims}}');
  const known = new Set(inputs.map((i) => i.name));
  const unknown = Object.keys(feeds).filter((name) => !known.has(name));
  const missing = inputs.filter((i) => !(i.name in feeds)).map((i) => i.name);
  if (unknown.length || missing.length) {
    throw new EdgepackError(`run(feeds): missing inputs [${missing.join(', ')}], unknown inputs [${unknown.join(', ')}]; ` +
      `the model takes ${inputs.map((i) => `${i.name} ${i.dtype} [${(i.shape ?? []).join(', ')}]`).join(', ')}`);
  }
  return Object.fromEntries(inputs.map((spec) => [spec.name, toTensor(ort, spec, feeds[spec.name])]));
}

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** The IEEE half-precision bits of a number, rounded to nearest even (as numpy's astype(float16)). */
function halfBits(value) {
  F32[0] = Number(value);
  const x = U32[0];
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  let mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0);  // inf, nan
  const e = exponent - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;  // too large: inf
  if (e <= 0) {  // subnormal half, or zero
    if (e < -10) return sign;
    mantissa |= 0x800000;
    const shift = 14 - e;
    const half = mantissa >>> shift;
    const rest = mantissa & ((1 << shift) - 1);
    const middle = 1 << (shift - 1);
    return sign | (half + (rest > middle || (rest === middle && (half & 1)) ? 1 : 0));
  }
  const half = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  return sign | (half + (rest > 0x1000 || (rest === 0x1000 && (half & 1)) ? 1 : 0));
}

function toTensor(ort, spec, value) {
  if (value instanceof ort.Tensor) return value;
  const where = `run(feeds): input ${spec.name}`;
  if (!value || value.data === undefined || value.dims === undefined) {
    throw new EdgepackError(`${where} must be {data, dims} or a Tensor`);
  }
  const [TypedArray, type] = DTYPES[spec.dtype] ?? [];
  if (!TypedArray) throw new EdgepackError(`${where} has dtype ${spec.dtype}, which this loader cannot feed`);
  const dims = Array.from(value.dims, Number);
  const shape = spec.shape ?? dims;
  // A dim of -1 (Paddle2ONNX), 0 or a name is dynamic, as in the Python shim.
  if (dims.length !== shape.length || shape.some((d, i) => Number.isInteger(d) && d > 0 && d !== dims[i])) {
    throw new EdgepackError(`${where}: dims [${dims.join(', ')}] do not fit the model's shape [${shape.join(', ')}]`);
  }
  let data = value.data;
  if (type === 'string' && !(Array.isArray(data) && data.every((v) => typeof v === 'string'))) {
    throw new EdgepackError(`${where} is a string tensor: pass a plain array of strings`);
  }
  if (!(data instanceof TypedArray)) {
    if (!Array.isArray(data)) {
      throw new EdgepackError(`${where} is ${spec.dtype}: pass a ${TypedArray.name} or a plain array, got ${data?.constructor?.name}`);
    }
    if (type === 'float16') data = Uint16Array.from(data, halfBits);  // numbers, not their bit patterns
    else data = TypedArray === BigInt64Array || TypedArray === BigUint64Array ? TypedArray.from(data, (v) => BigInt(v)) : TypedArray.from(data);
  }
  const count = dims.reduce((a, b) => a * b, 1);
  if (data.length !== count) {
    throw new EdgepackError(`${where}: ${data.length} values, but dims [${dims.join(', ')}] need ${count}`);
  }
  return new ort.Tensor(type, data, dims);
}

// --- signatures: model.sig in the OpenSSF model-signing format, checked with WebCrypto ----------------

const SIGNATURE = 'model.sig';
const BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
const PAYLOAD_TYPE = 'application/vnd.in-toto+json';
const PREDICATE_TYPE = 'https://model_signing/signature/v1.0';
const P256 = { name: 'ECDSA', namedCurve: 'P-256' };

/**
 * Check model.sig against publicKey and the manifest just fetched; return the key's fingerprint (SHA-256
 * hex of its PEM, model-signing's key hint). The signed statement must list manifest.json with the
 * SHA-256 of manifestBytes and every file of manifest.json with its sha256: every later file is then
 * held to its manifest integrity, so the signature covers every byte the loader uses.
 */
async function verifySignature(files, manifest, manifestBytes, publicKey) {
  const refuse = (message, hint) => new EdgepackError(message, { file: SIGNATURE, hint });
  if (!globalThis.crypto?.subtle) {
    throw refuse('a signature is required but this page has no WebCrypto (crypto.subtle needs a secure context)',
      'serve the page over https, or from localhost');
  }
  const { key, fingerprint } = await importP256(publicKey);
  const sigBytes = await files.latest(SIGNATURE).catch((error) => {
    throw refuse(`the bundle is not signed (${error.message.split('\n')[0]}) and options.publicKey requires a signature by key ${fingerprint}`);
  });
  let envelope, payload, signature, hint;
  try {
    const document = JSON.parse(new TextDecoder().decode(sigBytes));
    envelope = document.dsseEnvelope;
    if (document.mediaType !== BUNDLE_MEDIA_TYPE || envelope.payloadType !== PAYLOAD_TYPE || envelope.signatures.length !== 1) {
      throw new Error('not a model-signing key signature');
    }
    hint = document.verificationMaterial?.publicKey?.hint;
    payload = fromBase64(envelope.payload);
    signature = derToP1363(fromBase64(envelope.signatures[0].sig));
  } catch (error) {
    throw refuse(`malformed (${error.message})`);
  }
  if (hint && hint !== fingerprint) {
    throw refuse(`signed with another key: it names key ${hint}, the required key is ${fingerprint}`);
  }
  const head = new TextEncoder().encode(`DSSEv1 ${PAYLOAD_TYPE.length} ${PAYLOAD_TYPE} ${payload.length} `);
  const signed = new Uint8Array(head.length + payload.length);
  signed.set(head);
  signed.set(payload, head.length);
  if (!signature || !(await crypto.subtle.verify({ name: 'ECDSA', hash: 'SHA-256' }, key, signature, signed))) {
    throw refuse(`the signature does not verify with key ${fingerprint} (tampered, or signed with another key)`);
  }
  const digests = { 'manifest.json': await sha256Hex(manifestBytes) };
  for (const [rel, entry] of Object.entries(manifest.files)) digests[rel] = entry.sha256;
  const problem = await statementProblem(payload, digests);
  if (problem) throw refuse(problem);
  return fingerprint;
}

async function importP256(publicKey) {
  let spki;
  if (typeof publicKey === 'string') {
    const body = /-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----/.exec(publicKey);
    if (!body) throw new EdgepackError('options.publicKey is not a PEM public key (-----BEGIN PUBLIC KEY-----)');
    spki = fromBase64(body[1].replace(/\s+/g, ''));
  } else if (publicKey instanceof CryptoKey) {
    spki = new Uint8Array(await crypto.subtle.exportKey('spki', publicKey));
  } else {
    throw new EdgepackError('options.publicKey must be a PEM string or a CryptoKey');
  }
  let key;
  try {
    key = await crypto.subtle.importKey('spki', spki, P256, false, ['verify']);
  } catch (error) {
    throw new EdgepackError(`options.publicKey is not an ECDSA P-256 public key (${error.message})`);
  }
  const text = btoa(String.fromCharCode(...spki)).replace(/.{1,64}/g, '$&\n');
  const fingerprint = await sha256Hex(new TextEncoder().encode(`-----BEGIN PUBLIC KEY-----\n${text}-----END PUBLIC KEY-----\n`));
  return { key, fingerprint };
}

/** What differs between the signed statement and the bundle's digests (null: nothing). */
async function statementProblem(payload, digests) {
  let statement, listed, root;
  try {
    statement = JSON.parse(new TextDecoder().decode(payload));
    const { serialization, resources } = statement.predicate;
    if (serialization.method !== 'files' || serialization.hash_type !== 'sha256') return 'only files/sha256 serialization is read';
    listed = Object.fromEntries(resources.map((r) => [r.name, r.digest]));
    const all = new Uint8Array(resources.length * 32);
    resources.forEach((r, i) => {
      if (r.algorithm !== 'sha256' || !/^[0-9a-f]{64}$/.test(r.digest)) throw new Error(`bad digest for ${r.name}`);
      all.set(r.digest.match(/../g).map((h) => parseInt(h, 16)), i * 32);
    });
    root = await sha256Hex(all);
  } catch (error) {
    return `the signed statement is malformed (${error.message})`;
  }
  if (statement.predicateType !== PREDICATE_TYPE) return `the signed statement is not a model-signing v1.0 statement (${statement.predicateType})`;
  if (root !== statement.subject?.[0]?.digest?.sha256) return 'the signed statement is inconsistent (its subject digest does not match its resources)';
  const found = {
    'not signed': Object.keys(digests).filter((rel) => !(rel in listed)).sort(),
    'signed but not in the bundle': Object.keys(listed).filter((rel) => !(rel in digests)).sort(),
    'changed since signing': Object.keys(digests).filter((rel) => rel in listed && listed[rel] !== digests[rel]).sort(),
  };
  const parts = Object.entries(found).filter(([, names]) => names.length).map(([kind, names]) => `${kind}: ${names.join(', ')}`);
  return parts.length ? parts.join('; ') : null;
}

/** A strict DER ECDSA signature as WebCrypto's r||s (64 bytes); null when it is not strict DER. */
function derToP1363(der) {
  if (der.length < 8 || der[0] !== 0x30 || der[1] >= 0x80 || der[1] !== der.length - 2) return null;
  const out = new Uint8Array(64);
  let i = 2;
  for (const at of [0, 32]) {
    if (der[i] !== 0x02) return null;
    const size = der[i + 1];
    let body = der.subarray(i + 2, i + 2 + size);
    if (size === 0 || size > 33 || body.length !== size || body[0] & 0x80 || (size > 1 && body[0] === 0 && !(body[1] & 0x80))) return null;
    if (size === 33) body = body.subarray(1);
    out.set(body, at + 32 - body.length);
    i += 2 + size;
  }
  return i === der.length ? out : null;
}

function fromBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

async function sha256Hex(bytes) {
  return Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)), (b) => b.toString(16).padStart(2, '0')).join('');
}
