"""Web bundles in headless Chromium: time to first inference (cold and warm) and bundle sizes.

    .venv/bin/python benchmarks/browser.py [--runs 5] [--models cnn,transformer]

For each example model it packages browser-wasm and browser-webgpu bundles, then prints:
- sizes: every bundle's total bytes raw and gzipped (level 6, as web servers compress), and its
  onnxruntime-web files alone;
- time to first inference of the demo page (navigation start -> first outputs, as index.html measures it)
  cold (a fresh browser profile: empty HTTP cache and Cache API) and warm (the page visited again: edgepack
  takes its files from its Cache API cache, re-hashed, and compiles the WebAssembly from there);
- side by side, the same model loaded by plain onnxruntime-web from URLs (no verification: its own
  fetches, 304 revalidations, streaming WebAssembly compilation and the browser's code cache), and the
  ratio edgepack / plain, which is the price of verifying every byte before onnxruntime-web sees it;
- edgepack offline: the page reloaded once more with nothing answering but the page itself and
  edgepack.mjs (standing for the site's own offline copy), so every other file comes from the cache;
- edgepack's loader in a page as bare as the plain one (loader.html), cold and warm: the demo page's own
  layout left out, so its ratio to plain is the loader's alone.
Runs alternate between the three pages; medians are printed. The machine is shared: read ratios.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from in_browser import chromium  # noqa: E402

from edgepack.bundle import ortweb  # noqa: E402
from edgepack.bundle.manifest import read_manifest  # noqa: E402
from edgepack.examples import write_example  # noqa: E402
from edgepack.pipeline.job import Options  # noqa: E402
from edgepack.pipeline.run import package_model  # noqa: E402
from edgepack.profiles import load_profile  # noqa: E402
from edgepack.serve import start_server  # noqa: E402

# The same model and runtime files, loaded by onnxruntime-web the usual way (URLs, nothing verified).
PLAIN_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>plain</title>
<script type="module">
  const manifest = await (await fetch('manifest.json')).json();
  const ort = await import('./ort/' + manifest.profile.web.entry);
  ort.env.wasm.numThreads = crossOriginIsolated ? Math.min(navigator.hardwareConcurrency, 2) : 1;
  const session = await ort.InferenceSession.create(manifest.model.file, {
    executionProviders: manifest.runtime.execution_providers.map((p) => p.name),
    extra: manifest.runtime.session_options.config_entries,
  });
  const feeds = {};
  for (const spec of manifest.model.inputs) {
    const dims = spec.shape.map((d, i) => (Number.isInteger(d) ? d : i === 0 ? 1 : 8));
    const n = dims.reduce((a, b) => a * b, 1);
    feeds[spec.name] = spec.dtype === 'int64' ? new ort.Tensor('int64', new BigInt64Array(n).fill(1n), dims)
                                              : new ort.Tensor('float32', new Float32Array(n).fill(0.5), dims);
  }
  await session.run(feeds);
  window.edgepackDemo = { status: 'done', timings: { firstInferenceMs: performance.now() } };
</script>"""


# edgepack's loader in a page as bare as PLAIN_PAGE: the demo page's own cost (its layout, its tables) left out.
LOADER_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>loader</title>
<script type="module">
  import { load } from './edgepack.mjs';
  const model = await load();
  const feeds = {};
  for (const spec of model.inputs) {
    const dims = spec.shape.map((d, i) => (Number.isInteger(d) ? d : i === 0 ? 1 : 8));
    const n = dims.reduce((a, b) => a * b, 1);
    feeds[spec.name] = spec.dtype === 'int64' ? { data: new BigInt64Array(n).fill(1n), dims }
                                              : { data: new Float32Array(n).fill(0.5), dims };
  }
  await model.run(feeds);
  const firstInferenceMs = performance.now();
  await model.cached;  // as the demo page does: the files are stored once the page is idle, before the next visit
  window.edgepackDemo = { status: 'done', timings: { firstInferenceMs } };
</script>"""

PAGES = {"edgepack": "index.html", "loader": "loader.html", "plain": "plain.html"}


def sizes(bundle: Path) -> dict[str, int]:
    total = gzipped = runtime = runtime_gz = 0
    for path in bundle.rglob("*"):
        if not path.is_file() or path.name in ("plain.html", "loader.html"):
            continue
        raw = path.read_bytes()
        packed = len(gzip.compress(raw, compresslevel=6))
        total, gzipped = total + len(raw), gzipped + packed
        if path.parent.name == "ort":
            runtime, runtime_gz = runtime + len(raw), runtime_gz + packed
    return {"total": total, "gzip": gzipped, "runtime": runtime, "runtime_gzip": runtime_gz}


def first_inference(page, url: str) -> float:
    page.goto(url)
    page.wait_for_function("window.edgepackDemo && window.edgepackDemo.status !== 'loading'", timeout=120_000)
    demo = page.evaluate("window.edgepackDemo")
    if demo["status"] != "done":
        raise SystemExit(f"{url}: {demo.get('error')}")
    return demo["timings"]["firstInferenceMs"]


def offline(page, bundle: Path, url: str) -> float:
    """``url`` (the bundle's index.html) again, answered only for the page and the loader: no server for the rest."""
    shell = {
        url: ("text/html", bundle / "index.html"),
        url.replace("index.html", "edgepack.mjs"): ("text/javascript", bundle / "edgepack.mjs"),
    }

    def answer(route):
        if route.request.url not in shell:
            return route.abort("connectionrefused")
        kind, path = shell[route.request.url]
        route.fulfill(
            body=path.read_bytes(),
            content_type=kind,
            headers={"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"},
        )

    page.route(url.rsplit("/", 1)[0] + "/**", answer)
    try:
        return first_inference(page, url)
    finally:
        page.unroute_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="cnn,transformer")
    args = parser.parse_args()
    tarball = ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as scratch:
        root = Path(scratch)
        bundles = []
        for name in args.models.split(","):
            model = write_example(name, root)
            results = package_model(
                model,
                [load_profile("browser-wasm"), load_profile("browser-webgpu")],
                Options(output=root / "site", ort_web=tarball),
            )
            for result in results:
                if not result.ok:
                    raise SystemExit(str(result.error))
                (result.bundle / "plain.html").write_text(PLAIN_PAGE, encoding="utf-8")
                (result.bundle / "loader.html").write_text(LOADER_PAGE, encoding="utf-8")
                bundles.append(result.bundle)
        server = start_server(root / "site", require_manifest=False)
        print(f"{'bundle':<28} {'total MB':>9} {'gzip MB':>8} {'ort/ MB':>8} {'ort/ gz':>8}")
        for bundle in bundles:
            s = sizes(bundle)
            print(
                f"{bundle.name:<28} {s['total'] / 1e6:>9.2f} {s['gzip'] / 1e6:>8.2f} {s['runtime'] / 1e6:>8.2f} "
                f"{s['runtime_gzip'] / 1e6:>8.2f}"
            )
        print(
            f"\ntime to first inference, ms since navigation start (median of {args.runs}; cold = fresh profile, "
            f"warm = visited again, offline = and again with no server)"
        )
        print("(loader = edgepack.mjs in a page as bare as the plain one, without the demo page's tables)")
        print(
            f"{'bundle':<28} {'edgepack cold':>13} {'warm':>7} {'offline':>7} {'loader cold':>11} {'warm':>7} "
            f"{'plain ORT cold':>15} {'warm':>7} {'ratio cold':>10} {'warm':>6} {'loader cold':>11} {'warm':>6}  backend"
        )
        for bundle in bundles:
            url = f"{server.url}{bundle.name}/"
            times = {kind: [] for kind in PAGES}
            for _ in range(args.runs):
                for kind, name in PAGES.items():
                    with chromium() as context:
                        page = context.new_page()
                        visits = [first_inference(page, url + name), first_inference(page, url + name)]
                        if kind == "edgepack":
                            visits.append(offline(page, bundle, url + name))
                        times[kind].append(visits)
            med = {k: [statistics.median(visit) for visit in zip(*v)] for k, v in times.items()}
            (cold, warm, off), (bare_cold, bare_warm), (plain_cold, plain_warm) = (
                med["edgepack"],
                med["loader"],
                med["plain"],
            )
            backend = read_manifest(bundle)["runtime"]["execution_providers"][0]["name"]
            print(
                f"{bundle.name:<28} {cold:>13.0f} {warm:>7.0f} {off:>7.0f} {bare_cold:>11.0f} {bare_warm:>7.0f} "
                f"{plain_cold:>15.0f} {plain_warm:>7.0f} {cold / plain_cold:>10.2f} {warm / plain_warm:>6.2f} "
                f"{bare_cold / plain_cold:>11.2f} {bare_warm / plain_warm:>6.2f}  {backend} preferred (no GPU here: wasm runs)"
            )
        server.shutdown()
        shutil.rmtree(root / "site", ignore_errors=True)


if __name__ == "__main__":
    main()
