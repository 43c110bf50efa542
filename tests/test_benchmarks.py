"""The large-model benchmarks run as written, at their reduced sizes on this CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def table(output, header):
    """The rows of the Markdown table whose header starts with ``header``."""
    block = output[output.index(header):].split("\n\n")[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in block[2:]]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_at_reduced_size_on_the_cpu():
    output = run(ROOT / "benchmarks" / "gpu.py", "--cpu")
    models = ["BLIP-VQA base", "BLIP-2 OPT-2.7b", "InstructBLIP Vicuna-7B-sized", "LLaVA-1.5-7B-sized"]
    training = table(output, "| model | parameters | method |")
    assert [(r[0], r[2]) for r in training] == [(m, k) for m in models
                                                 for k in ("prefix", "LoRA (PEFT)", "full fine-tuning")]
    assert all(float(r[4].removesuffix(" s")) > 0 for r in training)
    prefix, lora = (float(r[3].rstrip("%")) for r in training[:2])
    assert 0 < prefix < lora < 100
    overhead = table(output, "| model | measurement | without prefix |")
    assert [r[0] for r in overhead] == [m for m in models for _ in range(2)]
    assert all(float(r[4]) > 0 for r in overhead)
    routing = table(output, "| model | measurement (tokens/s) |")
    assert [r[0] for r in routing] == models
    assert all(float(cell) > 0 for r in routing for cell in r[2:])
    assert re.search(r"\((\d+) s in all\)", output)


@pytest.mark.slow
def test_the_memory_benchmark_runs_at_reduced_size():
    output = run(ROOT / "benchmarks" / "memory.py", "--reduced")
    rows = table(output, "| base | weight memory |")
    assert [r[0] for r in rows] == ["bf16", "int8"]
    weights = [float(r[1].removesuffix(" MiB")) for r in rows]
    assert weights[1] < weights[0], "int8 weights take less memory"
    for row in rows:
        loaded, mapped = (float(x) for x in re.findall(r"(\d+) MiB", row[2]))
        peak, anon = (float(cell.split(" MiB")[0]) for cell in row[3:5])
        assert peak >= loaded > mapped > 0, row
        assert 0 < anon < peak, "anonymous memory is part of the resident set"


def test_quantized_weights_are_counted_as_stored():
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quantized import weight_bytes

    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
    assert weight_bytes(model) == 256 * 128 * 4
    quantize_(model, Int8WeightOnlyConfig())
    # int8 values; per output channel a float32 scale and an int8 zero point
    assert weight_bytes(model) == 256 * 128 + 128 * (4 + 1)


@pytest.mark.slow
def test_the_hostile_input_benchmark_runs_and_the_huge_questions_are_refused():
    output = run(ROOT / "benchmarks" / "hostile_input.py", "--requests", "16", "--clients", "4", "--rounds", "2",
                 "--hostile-clients", "1")
    rows = table(output, "| mode | wall seconds")
    assert [r[0] for r in rows] == ["alone", "with hostile requests"] and all(float(r[1]) > 0 for r in rows)
    assert "hostile requests answered: {'HTTP 400': 8}" in output


@pytest.mark.slow
def test_the_serving_load_and_memory_benchmark_runs_small_and_every_answer_is_right():
    output = run(ROOT / "benchmarks" / "serve_load.py", "load", "--clients", "4", "--prefixes", "3", "--requests", "18",
                 "--rounds", "2")
    rows = table(output, "| clients | prefixes | batching |")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("4", "3", "step", "18"), ("4", "3", "request", "18")]
    assert all(r[-1] == "0" for r in rows), "every answer equals the request alone"
    assert float(rows[0][7].split()[0]) > 1, "rows share decoding steps"
    assert re.search(r"prefixes change [1-9]\d* of 18 answers", output), "the prefixes matter, or the check proves nothing"
    memory = table(run(ROOT / "benchmarks" / "serve_load.py", "memory", "--counts", "1", "2"), "| prefixes N |")
    (one, _), (two, apart) = [[float(cell.split()[0]) for cell in r[1:]] for r in memory]
    assert two < 1.1 * one and apart > 1.6 * one
