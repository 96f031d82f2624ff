"""Export cost and fidelity of packaging from PyTorch, and what torch costs ONNX-only packaging.

Prints, for a small CNN and a small transformer encoder: dynamo and legacy export times side by side
(medians, ratio) and each export's max abs error / cosine against the module. Then the cold import of
onnxruntime's ORT-format converter in fresh processes, with and without edgepack's guard against
``onnxruntime.tools`` importing torch, interleaved, as a ratio.

    .venv/bin/python benchmarks/torch_export.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from edgepack.torch.export import _quiet
from edgepack.torch.verify import check_export


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, image):
        return self.fc(self.features(image).flatten(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.layers = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)

    def forward(self, input_ids):
        return self.layers(self.embed(input_ids))


def export(module, example, names, dynamic, folder: Path, dynamo: bool) -> tuple[float, dict]:
    path = folder / f"{type(module).__name__}-{'dynamo' if dynamo else 'legacy'}.onnx"
    started = time.perf_counter()
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {n: torch.export.Dim(n) for n in dynamic.values()}
            torch.onnx.export(
                module,
                (example,),
                path,
                dynamo=True,
                opset_version=17,
                external_data=False,
                input_names=names,
                dynamic_shapes=({a: dims[n] for a, n in dynamic.items()},),
            )
        else:
            torch.onnx.export(
                module,
                (example,),
                path,
                dynamo=False,
                opset_version=17,
                input_names=names,
                dynamic_axes={names[0]: dynamic},
            )
    seconds = time.perf_counter() - started
    with torch.no_grad():
        return seconds, check_export(path, lambda *x: module(*x), (example,))


IMPORT = "import time; t = time.perf_counter(); {guard}import onnxruntime.tools.convert_onnx_models_to_ort; print(time.perf_counter() - t)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    torch.manual_seed(0)
    cases = [
        (CNN().eval(), torch.randn(2, 3, 32, 32), ["image"], {0: "batch"}),
        (Encoder().eval(), torch.randint(0, 1000, (2, 16)), ["input_ids"], {0: "batch", 1: "seq"}),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        export(*cases[0], Path(scratch), True)  # the first dynamo export in a process builds the op registry
        for module, example, names, dynamic in cases:
            times = {True: [], False: []}
            figures = {}
            for _ in range(runs):
                for dynamo in (True, False):
                    seconds, figures[dynamo] = export(module, example, names, dynamic, Path(scratch), dynamo)
                    times[dynamo].append(seconds)
            d, lg = statistics.median(times[True]), statistics.median(times[False])
            print(
                f"{type(module).__name__}: dynamo {d:.2f} s, legacy {lg:.2f} s (dynamo/legacy {d / lg:.1f}x); "
                f"vs module: dynamo max abs {figures[True]['max_abs_error']:.2g} cosine {figures[True]['cosine']:.7f}, "
                f"legacy max abs {figures[False]['max_abs_error']:.2g} cosine {figures[False]['cosine']:.7f}"
            )
    guarded, plain = [], []
    for _ in range(runs):
        for guard, into in (
            ("from edgepack.ort_tools import without_torch_helper; without_torch_helper(); ", guarded),
            ("", plain),
        ):
            done = subprocess.run(
                [sys.executable, "-c", IMPORT.format(guard=guard)], capture_output=True, text=True, check=True
            )
            into.append(float(done.stdout))
    g, p = statistics.median(guarded), statistics.median(plain)
    print(f"import of the ORT-format converter: {p:.2f} s as is (imports torch), {g:.2f} s guarded: {p / g:.1f}x")


if __name__ == "__main__":
    main()
