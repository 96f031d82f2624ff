"""Web bundles in headless Chromium: time to first inference (cold and warm) and bundle sizes.

    .venv/bin/python benchmarks/browser.py [--runs 5] [--models cnn,transformer]

For each example model it packages browser-wasm and browser-webgpu bundles, then prints:
- sizes: every bundle's total bytes raw and gzipped (level 6, as web servers compress), and its
  onnxruntime-web files alone;
- time to first inference of the demo page (navigation start -> first outputs, as index.html measures it)
  cold (a fresh browser profile: empty HTTP cache) and warm (the page reloaded: files revalidated, 304s);
- side by side, the same model loaded by plain onnxruntime-web from URLs (no verification: its own
  fetches, streaming WebAssembly compilation and the browser's code cache), and the ratio
  edgepack / plain, which is the price of verifying every byte before onnxruntime-web sees it.
Runs alternate between the two pages; medians are printed. The machine is shared: read ratios.
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


def sizes(bundle: Path) -> dict[str, int]:
    total = gzipped = runtime = runtime_gz = 0
    for path in bundle.rglob("*"):
        if not path.is_file() or path.name == "plain.html":
            continue
        raw = path.read_bytes()
        packed = len(gzip.compress(raw, compresslevel=6))
        total, gzipped = total + len(raw), gzipped + packed
        if path.parent.name == "ort":
            runtime, runtime_gz = runtime + len(raw), runtime_gz + packed
    return {"total": total, "gzip": gzipped, "runtime": runtime, "runtime_gzip": runtime_gz}


def first_inference(context, url: str) -> float:
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("window.edgepackDemo && window.edgepackDemo.status !== 'loading'", timeout=120_000)
    demo = page.evaluate("window.edgepackDemo")
    if demo["status"] != "done":
        raise SystemExit(f"{url}: {demo.get('error')}")
    cold = demo["timings"]["firstInferenceMs"]
    page.reload()
    page.wait_for_function("window.edgepackDemo && window.edgepackDemo.status !== 'loading'", timeout=120_000)
    warm = page.evaluate("window.edgepackDemo")["timings"]["firstInferenceMs"]
    page.close()
    return cold, warm


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
            results = package_model(model, [load_profile("browser-wasm"), load_profile("browser-webgpu")],
                                    Options(output=root / "site", ort_web=tarball))
            for result in results:
                if not result.ok:
                    raise SystemExit(str(result.error))
                (result.bundle / "plain.html").write_text(PLAIN_PAGE, encoding="utf-8")
                bundles.append(result.bundle)
        server = start_server(root / "site", require_manifest=False)
        print(f"{'bundle':<28} {'total MB':>9} {'gzip MB':>8} {'ort/ MB':>8} {'ort/ gz':>8}")
        for bundle in bundles:
            s = sizes(bundle)
            print(f"{bundle.name:<28} {s['total'] / 1e6:>9.2f} {s['gzip'] / 1e6:>8.2f} {s['runtime'] / 1e6:>8.2f} "
                  f"{s['runtime_gzip'] / 1e6:>8.2f}")
        print(f"\ntime to first inference, ms since navigation start (median of {args.runs}; cold = fresh profile, "
              f"warm = reload)")
        print(f"{'bundle':<28} {'edgepack cold':>13} {'warm':>7} {'plain ORT cold':>15} {'warm':>7} {'ratio cold':>10} "
              f"{'warm':>6}  backend")
        for bundle in bundles:
            url = f"{server.url}{bundle.name}/"
            times = {"edgepack": [], "plain": []}
            for _ in range(args.runs):
                for kind, page in (("edgepack", "index.html"), ("plain", "plain.html")):
                    with chromium() as context:
                        times[kind].append(first_inference(context, url + page))
            med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in times.items()}
            backend = read_manifest(bundle)["runtime"]["execution_providers"][0]["name"]
            print(f"{bundle.name:<28} {med['edgepack'][0]:>13.0f} {med['edgepack'][1]:>7.0f} {med['plain'][0]:>15.0f} "
                  f"{med['plain'][1]:>7.0f} {med['edgepack'][0] / med['plain'][0]:>10.2f} "
                  f"{med['edgepack'][1] / med['plain'][1]:>6.2f}  {backend} preferred (no GPU here: wasm runs)")
        server.shutdown()
        shutil.rmtree(root / "site", ignore_errors=True)


if __name__ == "__main__":
    main()
