"""The build report: written after a real ``--target all`` build, opened in headless Chromium, the same bytes
on every run, and honest about damaged bundles and signatures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.accuracy import ERROR_EDGES
from edgepack.profiles import builtin_profile_names
from tests.in_browser import CHROMIUM, chromium

ALL = builtin_profile_names()


@pytest.fixture(scope="module")
def build(tmp_path_factory, cli) -> Path:
    """The example CNN for every built-in target, with --tune (random calibration, so static candidates exist)."""
    out = tmp_path_factory.mktemp("report-build")
    done = cli("package", "--example", "cnn", "--target", "all", "--tune", "--calibration", "random", "-o", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {out / 'report.html'} and report.md ({len(ALL)} bundles)" in done.stderr
    return out


@pytest.mark.slow
def test_package_with_several_targets_writes_the_report(build):
    html = (build / "report.html").read_text(encoding="utf-8")
    markdown = (build / "report.md").read_text(encoding="utf-8")
    for target in ALL:
        assert f"<b>{target}</b>" in html
        assert f"| {target} |" in markdown
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert "<script" not in html
    assert str(build) not in html and str(build) not in markdown  # no absolute path: the same bytes anywhere
    # the figures come from the manifests: a web bundle's gzip size and the --tune winner
    linux = json.loads((build / "cnn-linux-x64" / "manifest.json").read_text())
    winner = next(r for r in linux["stages"] if r["stage"] == "quantize")["tune"]["winner"]
    assert f"{winner} shipped. Why: {winner}: median" in markdown
    assert "gzip" in html and "--tune on linux-x64" in markdown


@pytest.mark.slow
def test_self_test_records_an_error_histogram_per_output(build):
    manifest = json.loads((build / "cnn-rpi-arm64" / "manifest.json").read_text())
    test = next(r for r in manifest["stages"] if r["stage"] == "self_test")
    histogram = test["outputs"]["logits"]["abs_error_histogram"]
    assert histogram["edges"] == ERROR_EDGES and len(histogram["counts"]) == len(ERROR_EDGES)
    assert sum(histogram["counts"]) == test["sample_sets"] * 10  # logits [1, 10] per input set
    # int8: some values are off by 1e-3 or more, none by 1 or more on this model
    assert sum(histogram["counts"][6:]) > 0 and histogram["counts"][-1] == 0


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/test.sh installs it)"
)
def test_report_opens_in_chromium_with_its_charts(build, tmp_path):
    from PIL import Image

    with chromium() as context:
        page = context.new_page()
        page.set_viewport_size({"width": 1280, "height": 900})
        problems, requests = [], []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((build / "report.html").as_uri())
        page.wait_for_load_state("load")
        assert problems == []
        assert requests == [(build / "report.html").as_uri()]  # nothing fetched: every chart is inline
        charts = {
            section: page.locator(f"#{section} figure svg").count()
            for section in ("size", "accuracy", "coverage", "tune")
        }
        assert charts == {"size": 1, "accuracy": 2, "coverage": 1, "tune": 1}  # accuracy: errors + one histogram
        assert page.locator("#summary tbody tr").count() == len(ALL)
        assert page.locator("#notices .notice").count() >= len(ALL) - 1  # every target but linux-x64 was not timed
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        for section in ("size", "tune"):
            page.locator(f"#{section} figure").first.screenshot(path=str(tmp_path / f"{section}.png"))
    image = Image.open(shot).convert("RGB")
    assert image.height > 3000  # the whole page, charts included
    # each chart drawn, not blank: its main colour (size: the raw-size bars, tune: the gate's passed bars) covers
    # a good part of it, and its text many shades
    for section, (red, green, blue) in (("size", (0x25, 0x63, 0xEB)), ("tune", (0x16, 0xA3, 0x4A))):
        chart = Image.open(tmp_path / f"{section}.png").convert("RGB")
        colors = chart.getcolors(maxcolors=1 << 20)
        assert chart.width > 900 and len(colors) > 50, section
        main = sum(n for n, (r, g, b) in colors if abs(r - red) + abs(g - green) + abs(b - blue) < 30)
        assert main > 0.02 * chart.width * chart.height, section


@pytest.mark.slow
def test_report_is_byte_identical_across_runs(build, cli):
    written = {name: (build / name).read_bytes() for name in ("report.html", "report.md")}
    again = cli("report", build)
    assert again.returncode == 0, again.stderr
    assert {name: (build / name).read_bytes() for name in written} == written


@pytest.mark.slow
def test_two_builds_of_the_same_model_give_the_same_report(tmp_path, cli):
    reports = []
    for run in ("a", "b"):
        out = tmp_path / run
        done = cli("package", "--example", "cnn", "--target", "rpi-arm64,browser-wasm", "-o", out, "-q")
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        reports.append(((out / "report.html").read_bytes(), (out / "report.md").read_bytes()))
    assert reports[0] == reports[1]


def test_one_target_writes_no_report_and_never_imports_matplotlib(tmp_path):
    code = (
        "import sys; from edgepack.cli import main; "
        f"code = main(['package', '--example', 'cnn', '--target', 'linux-x64', '-o', {str(tmp_path)!r}, '-q']); "
        "print(code, 'matplotlib' in sys.modules, 'rich' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stdout + done.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("report-small")
    done = cli("package", "--example", "cnn", "--target", "rpi-arm64,linux-x64", "--quantize", "none", "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    return out


def test_report_shows_changed_files_and_unreadable_manifests(small_build, tmp_path, cli):
    build = tmp_path / "build"
    shutil.copytree(small_build, build)
    (build / "cnn-linux-x64" / "README.md").write_text("changed after packaging\n")
    broken = build / "cnn-broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (build / ".cnn-x.partial").mkdir()  # a bundle being written is no bundle yet
    done = cli("report", build, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    listed = json.loads(done.stdout)
    assert [(b["folder"], b["readable"]) for b in listed["bundles"]] == [
        ("cnn-broken", False),
        ("cnn-linux-x64", True),
        ("cnn-rpi-arm64", True),
    ]
    markdown = (build / "report.md").read_text()
    assert "files do not match the manifest: 1 changed" in markdown
    assert "manifest.json is unreadable" in markdown
    assert "| cnn-linux-x64 | 1 changed | unsigned (no model.sig) |" in markdown
    assert 'class="notice broken"' in (build / "report.html").read_text()


def test_report_shows_signatures(small_build, tmp_path, cli):
    keys = tmp_path / "keys"
    assert cli("keygen", keys / "release").returncode == 0
    build = tmp_path / "build"
    shutil.copytree(small_build, build)
    signed = cli("sign", build / "cnn-rpi-arm64", "--key", keys / "release.priv")
    assert signed.returncode == 0, signed.stderr
    pinned = cli(
        "package",
        "--example",
        "cnn",
        "--target",
        "linux-x64",
        "--quantize",
        "none",
        "-o",
        tmp_path / "pinned",
        "--sign-key",
        keys / "release.priv",
        "--pin-key",
        keys / "release.pub",
        "-q",
    )
    assert pinned.returncode == 0, pinned.stderr
    shutil.rmtree(build / "cnn-linux-x64")
    shutil.copytree(tmp_path / "pinned" / "cnn-linux-x64", build / "cnn-linux-x64")
    assert cli("report", build).returncode == 0
    markdown = (build / "report.md").read_text()
    assert "| cnn-rpi-arm64 | ok, 5 files | signed by key " in markdown and "not checked here" in markdown
    assert "| cnn-linux-x64 | ok, 6 files | signed with the pinned key " in markdown and "…, verified |" in markdown
    # a pinned bundle whose signature no longer matches its files is flagged
    manifest = build / "cnn-linux-x64" / "manifest.json"
    other = tmp_path / "other"
    assert cli("keygen", other).returncode == 0
    assert cli("sign", build / "cnn-linux-x64", "--key", tmp_path / "other.priv").returncode == 0
    assert manifest.is_file() and cli("report", build).returncode == 0
    markdown = (build / "report.md").read_text()
    assert "model.sig does not verify with the pinned key: signed with another key" in markdown


def test_manifest_text_is_escaped_in_the_page(small_build, tmp_path, cli):
    build = tmp_path / "build"
    shutil.copytree(small_build, build)
    path = build / "cnn-linux-x64" / "manifest.json"
    manifest = json.loads(path.read_text())
    quantize = next(r for r in manifest["stages"] if r["stage"] == "quantize")
    quantize["notice"] = "<img src=x onerror=alert(1)>"
    path.write_text(json.dumps(manifest))
    assert cli("report", build).returncode == 0
    html = (build / "report.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_report_of_a_folder_without_bundles_is_a_clean_error(tmp_path, cli, clean_failure):
    done = cli("report", tmp_path)
    clean_failure(done, "no edgepack bundle here")
    assert done.returncode == 2
    clean_failure(cli("report", tmp_path / "missing"), "not a folder")


def test_report_from_python(small_build, tmp_path):
    from edgepack.report import write_report

    build = tmp_path / "build"
    shutil.copytree(small_build, build)
    written = write_report(build)
    assert written.html == build / "report.html" and [b.target for b in written.bundles] == ["linux-x64", "rpi-arm64"]
    assert written.html.read_text().startswith("<!DOCTYPE html>")


def test_gzip_sizes_are_remembered_by_checksum_and_a_damaged_memory_is_ignored(tmp_path, monkeypatch):
    import importlib

    collecting = importlib.import_module("edgepack.report.collect")  # the module, not the function of that name

    data = tmp_path / "blob.bin"
    data.write_bytes(b"edgepack " * 5000)
    memory = tmp_path / "gzip-sizes.json"
    sizes = collecting._GzipSizes(memory, {})
    size = sizes.of(data, "ab" * 32)
    assert 0 < size < data.stat().st_size
    sizes.save()
    assert json.loads(memory.read_text())[f"{'ab' * 32}:{collecting.GZIP_LEVEL}"] == size
    monkeypatch.setattr(collecting, "_gzipped_size", lambda path: pytest.fail("a remembered size was computed again"))
    assert collecting._GzipSizes(memory, json.loads(memory.read_text())).of(data, "ab" * 32) == size
    memory.write_text("{not json")
    monkeypatch.setattr("edgepack.bundle.ortweb.cache_dir", lambda: tmp_path / "npm")
    assert collecting._GzipSizes.load().known == {}


def test_an_unchanged_report_is_not_rendered_again_and_any_change_renders_it(small_build, tmp_path, monkeypatch):
    import importlib

    from edgepack.report import write_report

    page = importlib.import_module("edgepack.report.page")
    monkeypatch.setattr("edgepack.bundle.ortweb.cache_dir", lambda: tmp_path / "cache" / "npm")
    build = tmp_path / "build"
    shutil.copytree(small_build, build)
    for name in ("report.html", "report.md"):
        (build / name).unlink()
    write_report(build)
    first = {name: (build / name).read_bytes() for name in ("report.html", "report.md")}
    renders = []
    real = page.render_html
    monkeypatch.setattr(page, "render_html", lambda bundles: renders.append(1) or real(bundles))

    write_report(build)  # same bundles, same files: nothing rendered, nothing rewritten
    assert renders == [] and {n: (build / n).read_bytes() for n in first} == first
    (build / "report.html").write_text("edited by hand")  # a page that is not the one rendered: rendered again
    write_report(build)
    assert renders == [1] and (build / "report.html").read_bytes() == first["report.html"]
    (build / "cnn-linux-x64" / "README.md").write_text("changed after packaging\n")  # other inputs: rendered again
    write_report(build)
    assert renders == [1, 1] and "1 changed" in (build / "report.md").read_text()
    (json_file := tmp_path / "cache" / "report-keys.json").write_text("{not json")  # a damaged memory: rendered
    write_report(build)
    assert renders == [1, 1, 1] and json.loads(json_file.read_text())
