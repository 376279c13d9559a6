"""Smoke tests of the benchmark scripts: each runs in ``--quick`` mode on tiny settings and writes JSON
with the expected keys. Speeds are never asserted here (STYLE.md: targets are met in benchmarks, not in
timed unit tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Each test starts one to three Python processes that import torch: several seconds each.
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1", "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the script printed no table"
    return json.loads(out.read_text())


def check_machine(record: dict) -> None:
    machine = record["machine"]
    for key in ("torch", "threads", "loadavg", "date_utc", "cpu_count"):
        assert key in machine
    assert len(machine["loadavg"]) == 3


def test_bench_step(tmp_path):
    record = run("bench_step", tmp_path, "--models", "mlp", "--methods", "dense,bame,sr_ste,bi_mask")
    check_machine(record)
    assert record["config"]["quick"] is True
    mlp = record["models"]["mlp"]
    assert mlp["baseline_ms"] > 0
    assert set(mlp["methods"]) == {"dense", "bame", "sr_ste", "bi_mask"}
    for name, rec in mlp["methods"].items():
        for key in ("ordinary_ms", "ordinary_ratio", "ordinary_phase", "update_ms", "amortised_ratio"):
            assert key in rec, (name, key)
    assert mlp["methods"]["bame"]["ordinary_phase"] == "evolution"
    assert mlp["methods"]["bame"]["update_phase"] == "update"
    assert mlp["methods"]["bame"]["mask_update_events"] > 0  # the update slot really updated masks
    assert mlp["methods"]["sr_ste"]["update_ms"] is None
    assert mlp["methods"]["bi_mask"]["update_ms"] is not None
    targets = {(t["method"], t["metric"]) for t in record["targets"]}
    assert targets == {("bame", "ordinary_ratio"), ("bame", "update_added"), ("sr_ste", "ordinary_ratio"),
                       ("bi_mask", "update_added_own")}
    assert all(isinstance(t["pass"], bool) for t in record["targets"])


def test_bench_update(tmp_path):
    record = run("bench_update", tmp_path)
    check_machine(record)
    assert record["step_ms"] > 0
    (nm, rec), = record["patterns"].items()
    assert nm == "1:16"
    for key in ("pure_ms", "method_ms", "pure_parts_ms", "sparse_weights", "method_share_of_step",
                "method_amortised_share"):
        assert key in rec
    assert set(rec["pure_parts_ms"]) == {"blocks", "lma", "obf"}
    assert rec["sparse_weights"] > 0


@pytest.mark.parametrize("model", ["mlp"])
def test_bench_memory(tmp_path, model):
    record = run("bench_memory", tmp_path, "--models", model, "--methods", "bame")
    check_machine(record)
    rows = record["models"][model]["methods"]
    assert set(rows) == {"baseline", "bame"}
    for rec in rows.values():
        for key in ("delta_mb", "ratio", "peak_mb", "baseline_mb", "runs"):
            assert key in rec
    assert rows["baseline"]["ratio"] in (1.0, None)  # None only if the baseline grew by nothing


def test_bench_kernel_step(tmp_path):
    record = run("bench_kernel_step", tmp_path)
    check_machine(record)
    assert record["config"]["quick"] is True
    assert set(record["patterns"]) == {"1:16", "1:4"}
    for rec in record["patterns"].values():
        assert rec["dense_ms"] > 0
        assert set(rec["variants"]) == {"static/masked", "static/sparse", "bame/masked", "bame/sparse"}
        assert rec["variants"]["bame/sparse"]["update_ms"] is not None
        assert rec["variants"]["static/sparse"]["layers"]  # per-layer plan notes
    assert {(t["nm"], t["method"]) for t in record["targets"]} == {
        ("1:16", "static"), ("1:16", "bame"), ("1:4", "static"), ("1:4", "bame")}


def test_bench_kernel_step_compiled(tmp_path):
    record = run("bench_kernel_step", tmp_path, "--patterns", "1:16", "--methods", "static", "--compile",
                 "--backend", "aot_eager")
    assert record["config"]["compile"] == "aot_eager"
    rec = record["patterns"]["1:16"]
    assert set(rec["variants"]) == {"static/masked", "static/sparse", "static/sparse/compiled"}
    compiled = rec["variants"]["static/sparse/compiled"]
    assert rec["dense_compiled_ms"] > 0 and compiled["update_ms"] is None
    assert compiled["compiled_dense_speedup"] == pytest.approx(rec["dense_compiled_ms"] / compiled["ordinary_ms"])


def test_bench_kernels(tmp_path):
    out = tmp_path / "bench_kernels.json"
    cmd = [sys.executable, str(BENCH / "bench_kernels.py"), "--shapes", "64x128", "--patterns", "1:16,2:4",
           "--tokens", "8", "--repeats", "1", "--warmup", "0", "--plan-repeats", "1", "--threads", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up" in done.stdout
    record = json.loads(out.read_text())
    assert [(r["shape"], r["pattern"]) for r in record["results"]] == [("64x128", "1:16"), ("64x128", "2:4")]
    for r in record["results"]:
        assert set(r["speedup"]) == {"fwd", "dx", "dw", "step", "step*"}
        assert r["plan"]["reason"].startswith(f"{r['pattern']} 64x128 T=8")
        for product in ("fwd", "dx", "dw"):  # a formulation was timed for every product, even a dense pick
            assert r["plan"]["timed"][product] != "dense"


def test_bench_compressed(tmp_path):
    record = run("bench_compressed", tmp_path, "--parts", "mlp,vit,memory,run")
    check_machine(record)
    assert set(record["mlp"]) == {"1:16"}
    for rec in (record["mlp"]["1:16"], record["vit"]):
        assert set(rec["ms"]) == {"dense", "static", "bame", "bame/update"} and rec["dense_ms"] > 0
        assert set(rec["speedup"]) == {"static", "bame", "bame_ordinary"}
        assert all(note.startswith("compressed; ") for note in rec["plans"].values())
    assert set(record["memory"]) == {"glibc default", "mmap above 128 KiB"}
    for mem in record["memory"].values():
        assert set(mem["ratio"]) == {"dense", "static", "bame"} and mem["ratio"]["dense"] == 1
    run_rec = record["run"]
    assert set(run_rec["wall_s"]) == {"dense", "bame"} and len(run_rec["epoch_ratio"]) == 1
    assert run_rec["config"]["bame"]["storage"] == "compressed" and 0 < run_rec["flops_ratio"] < 1
    assert [t["target"].split()[0] for t in record["targets"]] == ["mlp", "mlp", "vit", "vit", "bame"] + ["mlp"] * 4


# quick mode: two module objects of each inference kind
INFER_QUICK = {"infer attached", "infer attached 2", "infer squashed", "infer squashed 2", "infer squashed copy"}


def test_bench_overhead(tmp_path):
    record = run("bench_overhead", tmp_path, "--backend", "eager")
    check_machine(record)
    assert [(r["model"], r["batch"]) for r in record["results"]] == [("resnet18", 2), ("vit_tiny", 2)]
    for rec in record["results"]:
        assert set(rec["ms"]) == {"eager dense", "eager bame", "compiled dense", "compiled bame", "eager dense again",
                                  *INFER_QUICK}
        assert set(rec["ratios"]) == {"eager bame/dense", "compiled bame/dense", "A/A eager dense again/dense",
                                      "inference attached/squashed", "A/A inference squashed slowest/fastest",
                                      "placement: squashed copy/squashed"}
        ms = rec["ms"]
        attached = (ms["infer attached"] + ms["infer attached 2"]) / 2
        squashed = (ms["infer squashed"] + ms["infer squashed 2"]) / 2
        assert rec["ratios"]["inference attached/squashed"] == pytest.approx(attached / squashed)
    # quick mode times batch 2: only the inference targets apply
    assert [t["target"].split(" attached")[0] for t in record["targets"]] == ["resnet18 batch 2", "vit_tiny batch 2"]


def test_bench_overhead_inference_part_alone(tmp_path):
    record = run("bench_overhead", tmp_path, "--models", "vit_tiny", "--parts", "inference", "--inference-plain")
    (rec,) = record["results"]
    assert set(rec["ms"]) == INFER_QUICK | {"infer plain", "infer plain 2"}
    assert "diagnostic: plain/squashed" in rec["ratios"]
    assert len(rec["samples_ms"]["infer attached"]) == 2 and record["config"]["inference_repeats"] == 2
    assert [t["target"] for t in record["targets"]] == ["vit_tiny batch 2 attached inference <= 1.02x squashed"]


def test_share_tensors_leaves_only_the_code_different():
    import copy

    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from bench_overhead import as_plain, build, inference_candidates, share_tensors
    finally:
        sys.path.remove(str(BENCH))
    import bame

    base = build("resnet18", quick=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert set(inference_candidates(base, x, "2:4")) == {"infer attached", "infer attached 2", "infer attached 3",
                                                         "infer squashed", "infer squashed 2", "infer squashed 3",
                                                         "infer squashed copy"}
    attached, squashed, other, again = (copy.deepcopy(base) for _ in range(4))
    for model in (attached, squashed, other, again):
        sp = bame.sparsify(model, None, "bame", "2:4", total_steps=10**9, t_i=0, t_f=10**9, delta_t=100,
                           verbose=False)
        sp.step_count = 101
        sp.prepare(101)
        if model not in (attached, again):
            sp.squash()
    before = {k: v.data_ptr() for k, v in squashed.state_dict().items()}
    share_tensors(squashed, attached)
    own = {t.data_ptr() for t in list(attached.parameters()) + list(attached.buffers())}
    shared = [k for k, v in squashed.state_dict().items() if v.data_ptr() in own]
    assert shared == list(before) and all(before[k] != squashed.state_dict()[k].data_ptr() for k in before)
    with torch.no_grad():
        torch.testing.assert_close(squashed(x), attached(x), rtol=0, atol=0)
    # another attached copy shares every tensor, its masks included
    share_tensors(again, attached)
    assert [t.data_ptr() for t in list(again.parameters()) + list(again.buffers())] == [
        t.data_ptr() for t in list(attached.parameters()) + list(attached.buffers())]
    # run as plain modules, it computes the same with the plain classes' code on the raw weight
    as_plain(again)
    assert type(again.layer1[0].conv1) is torch.nn.Conv2d
    raw = attached.layer1[0].conv1.parametrizations.weight.original
    assert again.layer1[0].conv1.weight.data_ptr() == raw.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(again(x), attached(x), rtol=0, atol=0)
    # a squashed model whose weights differ from the attached one's is refused, not silently shared
    with torch.no_grad():
        other.layer1[0].conv1.weight.add_(1.0)
    with pytest.raises(SystemExit, match="layer1.0.conv1.weight"):
        share_tensors(other, attached)


def test_bench_gpu_plumbing_on_the_cpu(tmp_path):
    record = run("bench_gpu", tmp_path, "--device", "cpu")
    check_machine(record)
    assert record["device_name"] == "cpu"
    for part in ("semi", "deit", "compiled"):
        assert "skipped" in record[part]
    train = record["train"]
    assert len(train) == len(__import__("bame").methods.available()) + 2  # bf16 each, plus fp16 and compressed
    assert all(v["ok"] and v["steps"] == 3 and v["nm_weights"] for v in train.values())
    assert [t["pass"] for t in record["targets"]] == [True]


def test_gpu_check_says_so_without_a_gpu():
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["gpu_check: no CUDA device on this machine: nothing to check"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_balanced_orders_balance_positions_and_predecessors(n):
    from collections import Counter

    sys.path.insert(0, str(BENCH))
    try:
        from common import balanced_orders
    finally:
        sys.path.remove(str(BENCH))
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    reps = len(orders) // n
    for pos in range(n):  # every candidate at every position equally often
        assert Counter(order[pos] for order in orders) == {c: reps for c in range(n)}
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert pairs == {(a, b): reps for a in range(n) for b in range(n) if a != b}
