/**
 * edgepack.mjs: load an edgepack web bundle and run its model in the browser with onnxruntime-web.
 *
 *   import { load } from './edgepack.mjs';
 *   const model = await load({ onProgress: ({ file, loaded, total }) => console.log(file, loaded, total) });
 *   const outputs = await model.run({ image: { data: new Float32Array(3 * 32 * 32), dims: [1, 3, 32, 32] } });
 *   console.log(outputs.logits.data, model.backend, model.threads);
 *
 * What it checks, in order:
 * 1. The page is served over http(s): browsers refuse modules, fetches and threads from file:// pages.
 * 2. manifest.json is fetched (with options.manifestIntegrity, if given, as its Subresource Integrity)
 *    and must list every file this loader needs with a well-formed sha384 integrity. A malformed
 *    integrity is refused here, because browsers treat one as "no check at all".
 * 3. Every file (onnxruntime-web's JavaScript and WebAssembly, the model, its external data) must
 *    match its sha384 integrity in the manifest: checked with crypto.subtle as it streams in (with
 *    progress) in secure contexts, or by fetch() itself (fetch(url, {integrity})) elsewhere. A
 *    refusal names the file and says why (HTTP status, network, or expected and actual digests).
 * 4. Only verified bytes reach onnxruntime-web: its module is imported from a blob: URL of the
 *    verified bytes, its WebAssembly is passed as env.wasm.wasmBinary, the model as bytes and its
 *    external data as externalData entries whose path is the initializer's location.
 * 5. Threads need a crossOriginIsolated page (COOP/COEP headers); without one it runs one thread and
 *    says so in the result and the console.
 * 6. The manifest's execution providers are tried in order (e.g. webgpu, then wasm); the result
 *    says which one runs and why the ones before it did not. An FP16 or q4f16 model skips webgpu when the
 *    GPU adapter lacks the 'shader-f16' feature: onnxruntime-web would create the session and then
 *    fail on the first run.
 *
 * It depends only on the browser and the onnxruntime-web files in this bundle's ort/ folder.
 */

const SRI = /^sha384-[A-Za-z0-9+/]{64}$/;
const SCHEMA = 'edgepack.manifest/1';

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
};

const GRAPH_OPTIMIZATION = { disable: 'disabled', basic: 'basic', extended: 'extended', all: 'all' };

/** A problem with the bundle, the page or the inputs; `file` names the bundle file concerned, if any. */
export class EdgepackError extends Error {
  constructor(message, { file = null, hint = null, cause } = {}) {
    super((file ? `${file}: ` : '') + message + (hint ? `\n  hint: ${hint}` : ''), { cause });
    this.name = 'EdgepackError';
    this.file = file;
    this.hint = hint;
  }
}

// One onnxruntime-web instance per runtime: its WebAssembly is initialized once per page.
const runtimes = new Map();

/**
 * Load the bundle and create an inference session.
 * @param {object} [options]
 * @param {string|URL} [options.baseUrl] the bundle folder (default: the folder of this module)
 * @param {string} [options.manifestIntegrity] 'sha384-...' of manifest.json, to pin the manifest itself
 * @param {(p: {file: string, loaded: number, total: number}) => void} [options.onProgress] per-file download progress
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
  const onProgress = options.onProgress ?? (() => {});
  const manifest = await fetchManifest(base, options.manifestIntegrity);
  const web = manifest.profile?.web;
  if (!web?.entry || !Array.isArray(web.ort_web_files)) {
    throw new EdgepackError('profile.web (the onnxruntime-web files of this bundle) is missing', { file: 'manifest.json' });
  }
  const wasmName = web.ort_web_files.find((name) => name.endsWith('.wasm'));
  const runtimeFiles = { entry: `ort/${web.entry}`, wasm: `ort/${wasmName}` };
  const modelFile = manifest.model.file;
  const modelDir = modelFile.slice(0, modelFile.lastIndexOf('/') + 1);
  const dataFiles = manifest.model.external_data ?? [];
  for (const rel of [runtimeFiles.entry, runtimeFiles.wasm, modelFile, ...dataFiles]) entryOf(manifest, rel);

  const fetchOne = (rel) => fetchVerified(base, rel, entryOf(manifest, rel), onProgress);
  const key = `${entryOf(manifest, runtimeFiles.entry).integrity} ${entryOf(manifest, runtimeFiles.wasm).integrity}`;
  const isolated = globalThis.crossOriginIsolated === true;
  if (!runtimes.has(key)) {
    runtimes.set(key, startRuntime(fetchOne, runtimeFiles, threadsFor(manifest, isolated)));
  }
  const [ort, modelBytes, ...dataBytes] = await Promise.all([
    runtimes.get(key).catch((error) => { runtimes.delete(key); throw error; }),
    fetchOne(modelFile),
    ...dataFiles.map(fetchOne),
  ]);
  const fetched = performance.now();

  const warnings = [];
  const threads = ort.env.wasm.numThreads;
  if (!isolated) {
    warnings.push('the page is not crossOriginIsolated, so onnxruntime-web runs on one thread; serve it with ' +
      '"Cross-Origin-Opener-Policy: same-origin" and "Cross-Origin-Embedder-Policy: require-corp" (see README.md)');
  }
  const settings = manifest.runtime.session_options ?? {};
  const sessionOptions = {
    graphOptimizationLevel: GRAPH_OPTIMIZATION[settings.graph_optimization_level] ?? 'all',
    extra: { ...(settings.config_entries ?? {}) },
    externalData: dataFiles.map((rel, i) => ({ path: rel.slice(modelDir.length), data: dataBytes[i] })),
  };
  const { session, backend, fallbacks } = await createSession(ort, modelBytes, sessionOptions, manifest);
  for (const { backend: name, error } of fallbacks) warnings.push(`${name} is not available (${error}); running on ${backend}`);
  for (const warning of warnings) console.warn(`edgepack: ${warning}`);
  const ready = performance.now();

  const inputs = manifest.model.inputs;
  const outputs = manifest.model.outputs;
  return {
    inputs,
    outputs,
    backend,
    fallbacks,
    threads,
    crossOriginIsolated: isolated,
    warnings,
    manifest,
    ort,
    timings: { fetchMs: fetched - started, sessionMs: ready - fetched, loadMs: ready - started },
    /** Run the model. feeds: {name: {data, dims}} or onnxruntime-web Tensors; returns {name: Tensor} (data, dims, type). */
    async run(feeds) {
      const tensors = toTensors(ort, inputs, feeds);
      const results = await session.run(tensors);
      return Object.fromEntries(outputs.map(({ name }) => [name, results[name]]));
    },
    async dispose() {
      await session.release();
    },
  };
}

async function fetchManifest(base, manifestIntegrity) {
  const url = new URL('manifest.json', base);
  if (manifestIntegrity !== undefined && !SRI.test(manifestIntegrity)) {
    throw new EdgepackError(`options.manifestIntegrity must look like 'sha384-' + 64 base64 characters, got ${JSON.stringify(manifestIntegrity)}`);
  }
  const pinned = manifestIntegrity ? { integrity: manifestIntegrity, size: undefined, source: 'options.manifestIntegrity' } : null;
  const bytes = pinned ? await fetchVerified(base, 'manifest.json', pinned, () => {}) : await fetchPlain(url, 'manifest.json');
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(bytes));
  } catch (error) {
    throw new EdgepackError(`not valid JSON (${error.message}): the file is damaged`, { file: 'manifest.json', hint: 'package the model again' });
  }
  if (manifest?.schema !== SCHEMA || typeof manifest.files !== 'object' || !manifest.model || !manifest.runtime) {
    throw new EdgepackError(`not an edgepack manifest (expected schema ${SCHEMA})`, { file: 'manifest.json' });
  }
  return manifest;
}

function entryOf(manifest, rel) {
  const entry = manifest.files[rel];
  if (!entry) throw new EdgepackError(`manifest.json does not list ${rel}, which this bundle needs`, { file: rel });
  if (typeof entry.integrity !== 'string' || !SRI.test(entry.integrity) || !Number.isInteger(entry.size)) {
    throw new EdgepackError(`its integrity in manifest.json is malformed (${JSON.stringify(entry.integrity)}): manifest.json is damaged`, {
      file: rel,
      hint: 'package the model again',
    });
  }
  return entry;
}

/**
 * The file's bytes, verified against its Subresource Integrity from the manifest. In a secure context
 * (https, localhost) the body streams in with progress and its SHA-384 is checked with crypto.subtle;
 * elsewhere crypto.subtle does not exist, so fetch() checks the integrity itself, and since it hands
 * over the body only once verified, progress then jumps from 0 to the total.
 */
async function fetchVerified(base, rel, entry, onProgress) {
  const url = new URL(rel, base);
  const hashHere = Boolean(globalThis.crypto?.subtle);
  let bytes;
  try {
    const response = await fetch(url, hashHere ? {} : { integrity: entry.integrity });
    if (!response.ok) throw httpError(response, rel);
    bytes = await readBody(response, rel, entry.size, onProgress);
  } catch (error) {
    if (error instanceof EdgepackError) throw error;
    throw hashHere ? networkError(url, rel, error) : await explainRefusal(url, rel, entry, error);
  }
  if (hashHere) {
    const actual = await sri(bytes);
    if (actual !== entry.integrity) throw refusal(rel, entry, actual, bytes.byteLength);
  }
  if (entry.size !== undefined && bytes.byteLength !== entry.size) {
    throw refusal(rel, entry, 'the right digest', bytes.byteLength);
  }
  return bytes;
}

function refusal(rel, entry, actual, length) {
  const expected = `${entry.integrity}${entry.size !== undefined ? `, ${entry.size} bytes` : ''}`;
  return new EdgepackError(`refused: its content does not match ${entry.source ?? 'manifest.json'} (expected ${expected}; got ${actual}, ${length} bytes)`, {
    file: rel,
    hint: 'the file was altered or damaged after packaging; upload the bundle again',
  });
}

function networkError(url, rel, error) {
  return new EdgepackError(`cannot fetch ${url}: ${error.message}`, { file: rel, hint: 'is the server running?', cause: error });
}

async function fetchPlain(url, rel) {
  let response;
  try {
    response = await fetch(url);
  } catch (error) {
    throw networkError(url, rel, error);
  }
  if (!response.ok) throw httpError(response, rel);
  return new Uint8Array(await response.arrayBuffer());
}

async function readBody(response, rel, size, onProgress) {
  const total = size ?? Number(response.headers.get('Content-Length') ?? 0);
  const reader = response.body.getReader();
  // With the size known up front the bytes go straight into one buffer: a large model is held once, not twice.
  let bytes = new Uint8Array(total);
  let loaded = 0;
  onProgress({ file: rel, loaded, total });
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.byteLength > bytes.byteLength) {
      if (size !== undefined) {
        await reader.cancel();
        throw new EdgepackError(`refused: longer than the ${size} bytes manifest.json records`, { file: rel });
      }
      const grown = new Uint8Array(Math.max(2 * bytes.byteLength, loaded + value.byteLength));
      grown.set(bytes.subarray(0, loaded));
      bytes = grown;
    }
    bytes.set(value, loaded);
    loaded += value.byteLength;
    onProgress({ file: rel, loaded, total });
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
  } catch (error) {
    return networkError(url, rel, original);
  }
  if (!response.ok) return httpError(response, rel);
  const bytes = await response.arrayBuffer();
  return refusal(rel, entry, 'another digest', bytes.byteLength);
}

async function sri(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-384', bytes));
  return 'sha384-' + btoa(String.fromCharCode(...digest));
}

function threadsFor(manifest, isolated) {
  if (!isolated) return 1;
  const wanted = manifest.runtime.session_options?.intra_op_num_threads ?? 0;
  if (wanted > 0) return wanted;
  // onnxruntime-web's own default, min(4, ceil(cores / 2)), gives one thread on two cores: take at least two.
  const cores = navigator.hardwareConcurrency || 1;
  return Math.min(cores, Math.max(2, Math.min(4, Math.ceil(cores / 2))));
}

async function startRuntime(fetchOne, runtimeFiles, numThreads) {
  const [code, wasm] = await Promise.all([fetchOne(runtimeFiles.entry), fetchOne(runtimeFiles.wasm)]);
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
  ort.env.wasm.wasmBinary = wasm;
  ort.env.wasm.numThreads = numThreads;
  ort.env.wasm.proxy = false;
  return ort;
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
  if (dims.length !== shape.length || shape.some((d, i) => Number.isInteger(d) && d !== dims[i])) {
    throw new EdgepackError(`${where}: dims [${dims.join(', ')}] do not fit the model's shape [${shape.join(', ')}]`);
  }
  let data = value.data;
  if (!(data instanceof TypedArray)) {
    if (!Array.isArray(data)) {
      throw new EdgepackError(`${where} is ${spec.dtype}: pass a ${TypedArray.name} or a plain array, got ${data?.constructor?.name}`);
    }
    data = TypedArray === BigInt64Array || TypedArray === BigUint64Array ? TypedArray.from(data, (v) => BigInt(v)) : TypedArray.from(data);
  }
  const count = dims.reduce((a, b) => a * b, 1);
  if (data.length !== count) {
    throw new EdgepackError(`${where}: ${data.length} values, but dims [${dims.join(', ')}] need ${count}`);
  }
  return new ort.Tensor(type, data, dims);
}
