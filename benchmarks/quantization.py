"""Size, latency and accuracy of each quantization recipe, measured side by side.

Two models built in torch with seeded random weights: a ResNet-18-like CNN at 1x3x224x224 and a small
transformer encoder (4 layers, hidden 256, 4 heads) at sequence 128. Each recipe is applied by
edgepack's own code (``edgepack.recipes``), static ones calibrated on 32 inputs drawn like the
test inputs. There is no real data set here, so the CNN is made to behave like a trained classifier on
a synthetic one: images are one of CLASSES random prototype images plus noise, batch norms carry
statistics measured on such images (plus a random affine part), and the classifier head is fitted to
the prototypes by ridge regression on the backbone's features. Its logits then have real margins, not
the near-ties of a random head, so top-1 agreement means something (still weaker evidence than a
real data set).

Latency: median of RUNS runs at 1 and 2 threads, every variant (and PyTorch eager) run in turn inside
each round, so load from other processes on the machine hits all of them alike. Ratios are against
FP32 onnxruntime and against PyTorch eager FP32 at the same thread count (x < 1: faster).

    python benchmarks/quantization.py [--runs 50] [--models cnn,encoder]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgepack.accuracy import compare
from edgepack.recipes.dynamic import DynamicSettings
from edgepack.recipes.fp16 import Fp16Settings
from edgepack.recipes.quantize import model_bytes, quantize_model
from edgepack.recipes.static import StaticSettings

ALL_OPS = ["Conv", "MatMul", "Attention", "LSTM", "Gather"]


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    recipe: object
    used_by: str


VARIANTS = [
    Variant("dynamic S8, MatMul/Gather only", "dynamic", DynamicSettings(), "fallback: rpi, linux-x64"),
    Variant(
        "dynamic U8 incl. Conv",
        "dynamic",
        DynamicSettings(weight_type="uint8", op_types=ALL_OPS),
        "fallback: browser-wasm",
    ),
    Variant("dynamic S8 incl. Conv", "dynamic", DynamicSettings(weight_type="int8", op_types=ALL_OPS), "(not used)"),
    Variant("static QDQ U8S8 per-channel", "static", StaticSettings(), "rpi, linux-x64, nnapi"),
    Variant(
        "static QDQ S8S8 symmetric",
        "static",
        StaticSettings(activation_type="int8", weight_type="int8", symmetric_activations=True),
        "jetson --quantize static",
    ),
    Variant("static QDQ U8U8 per-channel", "static", StaticSettings(weight_type="uint8"), "browser-wasm"),
    Variant("fp16 (float32 I/O)", "fp16", Fp16Settings(), "ios, jetson, webgpu"),
]


# --- models ---------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (self.down(x) if self.down is not None else x))


class ResNet18Like(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


CLASSES = 10
PROTOTYPES = np.random.default_rng(100).standard_normal((CLASSES, 3, 224, 224)).astype(np.float32)


def images(seed: int, count: int) -> np.ndarray:
    """``count`` images, sample i of class i % CLASSES: its prototype plus noise of half its scale."""
    rng = np.random.default_rng(seed)
    noise = 0.5 * rng.standard_normal((count, 3, 224, 224)).astype(np.float32)
    return PROTOTYPES[np.arange(count) % CLASSES] + noise


def _train_like(model: ResNet18Like) -> None:
    """Batch-norm statistics measured on the data with a random affine part, then a ridge-regression
    head on the backbone's features: what training would give the network, in a few seconds."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = 0.5 + torch.rand(module.num_features, generator=generator)
            module.bias.data = 0.2 * torch.randn(module.num_features, generator=generator)
            module.momentum = None  # cumulative average over the batches below
    train = torch.from_numpy(images(10, 100))
    model.train()
    with torch.no_grad():
        for batch in train.split(20):
            model(batch)
    model.eval()
    with torch.no_grad():
        features = torch.cat(
            [
                torch.flatten(nn.functional.adaptive_avg_pool2d(model.layers(model.stem(b)), 1), 1)
                for b in train.split(20)
            ]
        ).double()
    targets = nn.functional.one_hot(torch.arange(len(train)) % CLASSES, CLASSES).double() * 10 - 5
    mean = features.mean(0)
    centred = features - mean
    weight = torch.linalg.solve(
        centred.T @ centred + 1.0 * torch.eye(features.shape[1], dtype=torch.float64), centred.T @ targets
    )
    model.fc.weight.data = weight.T.float()
    model.fc.bias.data = (targets.mean(0) - mean @ weight).float()


class Encoder(nn.Module):
    def __init__(self, vocab: int = 8000, hidden: int = 256, heads: int = 4, layers: int = 4, ffn: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(512, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList([EncoderLayer(hidden, heads, ffn) for _ in range(layers)])

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        x = self.norm(self.embed(ids) + self.position(positions))
        for layer in self.layers:
            x = layer(x)
        return x


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, dim=-1)
        x = self.norm1(x + self.out((attn @ v).transpose(1, 2).reshape(b, s, h)))
        return self.norm2(x + self.ffn(x))


def build(name: str, folder: Path):
    torch.manual_seed(0)
    if name == "cnn":
        model = ResNet18Like(CLASSES)
        _train_like(model)
        example = torch.randn(1, 3, 224, 224)
        input_name, output_name = "image", "logits"

        def make_inputs(seed: int, count: int):
            return [{"image": image[None]} for image in images(seed, count)]
    else:
        model = Encoder().eval()
        example = torch.randint(0, 8000, (1, 128))
        input_name, output_name = "input_ids", "hidden"

        def make_inputs(seed: int, count: int):
            rng = np.random.default_rng(seed)
            return [{"input_ids": rng.integers(0, 8000, (1, 128)).astype(np.int64)} for _ in range(count)]

    path = folder / f"{name}.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=17,
            dynamo=False,
        )
    return model, path, make_inputs


# --- measurement ----------------------------------------------------------------------------


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_size(path: Path, folder: Path, style: str) -> int:
    """Size after conversion to ORT format (arm platform) in ``style``: Fixed as rpi-arm64 and browser-wasm
    bundles hold it, Runtime as the mobile, Jetson and WebGPU ones do."""
    import contextlib
    import io

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    out = folder / f"ort_{style}_{path.parent.name}"
    out.mkdir(exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(
            path, output_dir=out, optimization_styles=[OptimizationStyle[style]], target_platform="arm"
        )
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    return (out / f"{path.stem}{suffix}.ort").stat().st_size


def latencies(model: nn.Module, paths: dict[str, Path], feeds: dict, runs: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    sessions = {name: session(p, threads) for name, p in paths.items()}
    tensor = torch.from_numpy(next(iter(feeds.values())))
    timings: dict[str, list[float]] = {name: [] for name in [*sessions, "torch"]}
    for _ in range(5):  # warm-up
        for s in sessions.values():
            s.run(None, feeds)
        with torch.inference_mode():
            model(tensor)
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            timings[name].append(time.perf_counter() - start)
        with torch.inference_mode():
            start = time.perf_counter()
            model(tensor)
            timings["torch"].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in timings.items()}


def accuracy(reference: Path, candidate: Path, inputs: list[dict]) -> dict:
    ref, got = session(reference, 2), session(candidate, 2)
    names = [o.name for o in ref.get_outputs()]
    expected = [dict(zip(names, ref.run(names, f))) for f in inputs]
    actual = [dict(zip(names, got.run(names, f))) for f in inputs]
    return compare(expected, actual)


def bench(name: str, runs: int, folder: Path, variants: list[Variant]) -> list[str]:
    model, fp32, make_inputs = build(name, folder)
    calibration = make_inputs(1, 32)
    tests = make_inputs(2, 200 if name == "cnn" else 50)
    paths = {"fp32": fp32}
    for i, variant in enumerate(variants):
        out = folder / f"{name}_{i}" / "model.onnx"
        quantize_model(fp32, out, variant.method, variant.recipe, calibration=calibration)
        paths[variant.name] = out
    times = {t: latencies(model, paths, tests[0], runs, t) for t in (1, 2)}
    fp32_bytes = model_bytes(fp32)
    fp32_ort = {style: ort_size(fp32, folder, style) for style in ("Fixed", "Runtime")}
    header = ""
    if name == "cnn":
        session_ = session(fp32, 2)
        logits = np.concatenate([session_.run(None, f)[0] for f in tests])
        ordered = np.sort(logits, axis=1)
        header = (
            f"; FP32 top-1 = prototype class on {np.mean(logits.argmax(1) == np.arange(len(tests)) % CLASSES):.0%}"
            f" of test inputs, median top-1 margin {np.median(ordered[:, -1] - ordered[:, -2]):.2f}"
            f" (logit std {logits.std():.2f})"
        )
    rows = [
        f"\n### {name}: {'ResNet-18-like, 1x3x224x224' if name == 'cnn' else 'encoder 4x256, seq 128'}; "
        f"torch eager FP32 {times[1]['torch']:.1f} ms (1 thread), {times[2]['torch']:.1f} ms (2 threads); "
        f"ORT FP32 {times[1]['fp32']:.1f} / {times[2]['fp32']:.1f} ms; {len(tests)} test inputs, {runs} runs{header}",
        "",
        "| recipe | used by | .onnx size | .ort Fixed | .ort Runtime | 1 thr ms | vs ORT FP32 | vs torch | 2 thr ms "
        "| vs ORT FP32 | vs torch | cosine | max abs err | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant_name, path in paths.items():
        figures = (
            accuracy(fp32, path, tests)
            if variant_name != "fp32"
            else {"cosine": 1.0, "max_abs_error": 0.0, "top1_agreement": 1.0 if name == "cnn" else None}
        )
        used = next((v.used_by for v in variants if v.name == variant_name), "reference")
        top1 = figures.get("top1_agreement")
        cells = [
            variant_name,
            used,
            f"{model_bytes(path) / fp32_bytes:.3f}x",
            *(f"{ort_size(path, folder, style) / fp32_ort[style]:.3f}x" for style in ("Fixed", "Runtime")),
        ]
        for t in (1, 2):
            ms = times[t][variant_name]
            cells += [f"{ms:.1f}", f"{ms / times[t]['fp32']:.2f}x", f"{ms / times[t]['torch']:.2f}x"]
        cells += [f"{figures['cosine']:.5f}", f"{figures['max_abs_error']:.3g}", "-" if top1 is None else f"{top1:.1%}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default="cnn,encoder")
    args = parser.parse_args()
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; ratios < 1 are faster/smaller"
    )
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as scratch:
        for name in args.models.split(","):
            for row in bench(name, args.runs, Path(scratch), VARIANTS):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
