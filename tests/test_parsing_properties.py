"""Property tests: corrupted profiles and manifests give a valid result or one EdgepackError, never a traceback.

Corruptions start from real files (the built-in profiles, a manifest written by edgepack): bytes
flipped, truncation, YAML/JSON garbage spliced in, keys removed or renamed, values replaced by values
of other types. A "valid result" must also be usable: a profile that loads serializes to strict JSON
(it is embedded in every manifest).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.bundle.manifest import hash_file, read_manifest, verify_bundle, write_manifest
from edgepack.errors import EdgepackError
from edgepack.profiles import Profile, builtin_profile_names, load_profile
from tests.support.manifests import minimal_content

TARGETS = Path(__file__).resolve().parent.parent / "targets"
PROFILE_TEXTS = [(TARGETS / f"{name}.yaml").read_text(encoding="utf-8") for name in builtin_profile_names()]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GARBAGE = st.sampled_from(
    [
        b"\x00",
        b"\xff\xfe",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b": :",
        b"- ",
        b"\t",
        b"\n  - x\n",
        b"&a ",
        b"*a",
        b"*nope",
        b"!!python/object:os.system ",
        b"!!binary x",
        b"%YAML 9.9\n",
        b"---\n",
        b"...\n",
        b"? ",
        b"|",
        b">",
        b'"',
        b"'",
        b"1e999",
        b"NaN",
        b".nan",
        b".inf",
        b"-.inf",
        b"null",
        b"~",
        b"true",
        b"2024-01-01",
        b"0x1F",
        b"\xef\xbb\xbf",
        b"[" * 3000,
        b'{"a":' * 3000,
        b"\\ud800",
        b'"\\ud800"',
    ]
)

OTHER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just(""),
    st.just("../../escape"),
    st.just("a\x00b"),
    st.just("x" * 600),
    st.builds(lambda: {"nested": {"deeper": []}}),  # built fresh each time: corruptions mutate what they draw
    st.dates(),
    st.binary(max_size=5),
)
KEYS = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["x" * 600, "a\x00b", "../up", "/abs", "."]))


@st.composite
def byte_corruption(draw, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace_all"]))
        position = draw(st.integers(0, max(0, len(data))))
        if kind == "flip" and data:
            position = min(position, len(data) - 1)
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(GARBAGE)
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 40))]
        elif kind == "replace_all":
            data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


@st.composite
def tree_corruption(draw, original):
    """Remove or rename a key, or replace a value by one of another type, somewhere in the tree."""
    import copy

    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        kind = draw(st.sampled_from(["remove", "rename", "replace"]))
        if kind == "remove":
            del parent[last]
        elif kind == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(last)
        else:
            parent[last] = draw(OTHER_VALUES)
    return data


# --- profiles ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="edgepack-props-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _load_profile_bytes(folder: Path, data: bytes):
    path = folder / "profile.yaml"
    path.write_bytes(data)
    try:
        profile = load_profile(str(path))
    except EdgepackError as exc:
        assert str(exc).strip()
        return None
    assert isinstance(profile, Profile)
    json.dumps(profile.to_dict(), allow_nan=False)  # embedded in every manifest: must be strict JSON
    return profile


@SETTINGS
@given(data=st.data())
def test_profile_byte_corruptions(scratch, data):
    original = data.draw(st.sampled_from(PROFILE_TEXTS)).encode("utf-8")
    _load_profile_bytes(scratch, data.draw(byte_corruption(original)))


@SETTINGS
@given(data=st.data())
def test_profile_tree_corruptions(scratch, data):
    original = yaml.safe_load(data.draw(st.sampled_from(PROFILE_TEXTS)))
    corrupted = data.draw(tree_corruption(original))
    text = yaml.safe_dump(corrupted, allow_unicode=True)
    _load_profile_bytes(scratch, text.encode("utf-8"))


@pytest.mark.parametrize(
    "text, says",
    [
        ("[" * 5000, "YAML"),
        ("a: &a [1, 2]\nb: *a\n", "aliases"),
        ("name: x\n" + "x: 1\n" * 2, "unknown key"),
    ],
)
def test_profile_garbage_examples(scratch, text, says):
    with pytest.raises(EdgepackError, match=says):
        load_profile(str(_write(scratch / "g.yaml", text)))


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("name", "../../outside", "key 'name'"),
        ("accuracy.max_abs_error", float("nan"), "finite"),
        ("budget.max_bundle_mb", float("inf"), "finite"),
        ("session.intra_op_num_threads", -2, "intra_op_num_threads"),
    ],
)
def test_profile_values_that_parse_but_cannot_work(scratch, key, value, says):
    data = yaml.safe_load(PROFILE_TEXTS[0])
    parent = data
    *steps, last = key.split(".")
    for step in steps:
        parent = parent.setdefault(step, {})
    parent[last] = value
    with pytest.raises(EdgepackError, match=says):
        load_profile(str(_write(scratch / "v.yaml", yaml.safe_dump(data))))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- manifests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_bundle(scratch):
    bundle = scratch / "bundle"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "m.onnx").write_bytes(b"model bytes")
    (bundle / "model" / "m.onnx.data").write_bytes(b"\0" * 100)
    (bundle / "README.md").write_text("hello")
    write_manifest(bundle, minimal_content("model/m.onnx", ["model/m.onnx.data"]))
    return bundle


def _check_manifest(bundle: Path, data: bytes) -> None:
    (bundle / "manifest.json").write_bytes(data)
    try:
        manifest = read_manifest(bundle)
        result = verify_bundle(bundle)
    except EdgepackError as exc:
        assert str(exc).strip()
        return
    assert isinstance(manifest["files"], dict)
    assert result.checked + len(result.missing) == len(manifest["files"])


@SETTINGS
@given(data=st.data())
def test_manifest_byte_corruptions(valid_bundle, data):
    original = (valid_bundle / "manifest.json").read_bytes()
    try:
        _check_manifest(valid_bundle, data.draw(byte_corruption(original)))
    finally:
        (valid_bundle / "manifest.json").write_bytes(original)


@SETTINGS
@given(data=st.data())
def test_manifest_tree_corruptions(valid_bundle, data):
    original = (valid_bundle / "manifest.json").read_bytes()
    corrupted = data.draw(tree_corruption(json.loads(original)))
    try:
        _check_manifest(valid_bundle, json.dumps(corrupted, default=str).encode("utf-8"))
    finally:
        (valid_bundle / "manifest.json").write_bytes(original)


def test_manifest_untouched_bundle_verifies(valid_bundle):
    result = verify_bundle(valid_bundle)
    assert result.ok and result.checked == 3
    assert read_manifest(valid_bundle)["files"]["README.md"] == hash_file(valid_bundle / "README.md")


@pytest.mark.parametrize("text", ["[" * 100000, '{"schema": ' * 100000, '"\\ud800"', "NaN", ""])
def test_manifest_garbage_examples(valid_bundle, text):
    original = (valid_bundle / "manifest.json").read_bytes()
    try:
        (valid_bundle / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        with pytest.raises(EdgepackError):
            verify_bundle(valid_bundle)
    finally:
        (valid_bundle / "manifest.json").write_bytes(original)


@pytest.mark.parametrize(
    "options, says",
    [
        ({"when": __import__("datetime").date(2024, 1, 1)}, "plain data"),
        ({"ratio": float("nan")}, "finite"),
        ({"blob": b"\x00\x01"}, "plain data"),
    ],
)
def test_provider_options_must_be_plain_data(scratch, options, says):
    """They are copied into manifest.json, which must stay strict JSON."""
    data = yaml.safe_load(PROFILE_TEXTS[0])
    data["execution_providers"][0]["options"] = options
    with pytest.raises(EdgepackError, match=says):
        load_profile(str(_write(scratch / "o.yaml", yaml.safe_dump(data))))
