"""benchmarks.llama7b and benchmarks.compile_time on the CPU: the --dry-run results (rows, keys, values), a row
moving on after an out-of-memory error, the profile summary's arithmetic and the eager compile-time rows."""

import dataclasses
import json
import math

import pytest
import torch

import fp8coat
from benchmarks import compile_time, llama7b

HAS_CACHE_FIELD = "cache_fp8_weights" in {f.name for f in dataclasses.fields(fp8coat.Recipe)}


def _run(tmp_path, *args) -> dict:
    assert llama7b.main(["--dry-run", "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "llama7b.json").read_text())


def _of(res: dict, row: str) -> list[dict]:
    return [r for r in res["rows"] if r["row"] == row]


def _check_ok(r: dict) -> None:
    assert set(r) == set(llama7b.ROW_KEYS)
    assert r["ok"] is True and r["oom"] is False
    assert r["tok_s"] > 0 and r["step_ms"] > 0
    assert r["tok_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_ms"] * 1e3, rel=1e-3)
    assert r["peak_gib"] is None if not torch.cuda.is_available() else r["peak_gib"] > 0
    assert math.isfinite(r["loss"]) and 3.0 < r["loss"] < 6.0  # ln(96) = 4.56 at random init
    assert r["build_s"] >= 0 and r["first_step_s"] >= 0 and r["wall_s"] >= r["build_s"]
    assert (r["seq"], r["layers"]) == (32, 2)


def test_dry_run_rows_and_json(tmp_path):
    res = _run(tmp_path, "--rows", "fp8coat_best,fp8coat_exact,fp8coat_best_cache,fp8coat_exact_cache")
    best, exact = _of(res, "fp8coat_best"), _of(res, "fp8coat_exact")
    assert [r["batch"] for r in best] == [2, 4] and [r["batch"] for r in exact] == [2]
    for r in best + exact:
        _check_ok(r)
        assert (r["recipe"], r["optimizer"], r["chunked_loss"], r["compiled"]) == ("coat", "fp8coat", True, False)
        assert r["cache_fp8_weights"] is (False if HAS_CACHE_FIELD else None)  # the recipe's default, recorded
    assert (best[0]["master_weights"], best[0]["step_in_backward"]) == ("bf16-stochastic", True)
    assert (exact[0]["master_weights"], exact[0]["step_in_backward"]) == ("bf16-remainder", False)
    for name in ("fp8coat_best_cache", "fp8coat_exact_cache"):
        rows = _of(res, name)
        assert len(rows) == 1 and rows[0]["cache_fp8_weights"] is True
        if HAS_CACHE_FIELD:
            _check_ok(rows[0])
        else:  # a clean failure naming the field, and the run goes on
            assert rows[0]["ok"] is False and rows[0]["oom"] is False and rows[0]["tok_s"] is None
            assert "cache_fp8_weights" in res["errors"][name]
    assert res["meta"]["commit"] and res["meta"]["command"].startswith("python -m benchmarks.llama7b --dry-run")
    assert res["config"]["plan"][0] == ["fp8coat_best", [2, 4]]
    assert [m["run"] for m in res["memory"]] == ["fp8coat_best@2", "fp8coat_best@4", "fp8coat_exact@2"] + (
        ["fp8coat_best_cache@2", "fp8coat_exact_cache@2"] if HAS_CACHE_FIELD else [])


def test_cache_rows_fail_cleanly_without_the_field(tmp_path, monkeypatch):
    """An fp8coat whose Recipe has no cache_fp8_weights: the cache rows fail with a message before any model is
    built, and the next row runs."""
    old_recipe = dataclasses.make_dataclass("OldRecipe", [("name", str)], frozen=True)("coat")
    monkeypatch.setattr(fp8coat, "get_recipe", lambda r: old_recipe)
    monkeypatch.setattr(llama7b, "build", lambda *a, **k: pytest.fail("no model is built for a failing row"))
    res = _run(tmp_path, "--rows", "fp8coat_best_cache,fp8coat_exact_cache",
               "--batches", "fp8coat_best_cache:2,4")
    assert [(r["row"], r["batch"], r["ok"], r["oom"]) for r in res["rows"]] == [
        ("fp8coat_best_cache", 2, False, False), ("fp8coat_exact_cache", 2, False, False)]
    assert all("does not have" in res["errors"][n] and "cache_fp8_weights" in res["errors"][n]
               for n in ("fp8coat_best_cache", "fp8coat_exact_cache"))
    assert res["memory"] == []


def test_cache_field_reaches_the_recipe(tmp_path, monkeypatch):
    """The cache rows pass cache_fp8_weights=True to the recipe given to fp8coat.convert, the other rows leave the
    recipe's default (off) (with a stand-in Recipe carrying the field where the installed fp8coat has none)."""
    if not HAS_CACHE_FIELD:
        @dataclasses.dataclass(frozen=True)
        class CacheRecipe(fp8coat.Recipe):
            cache_fp8_weights: bool = False

        coat = fp8coat.get_recipe("coat")
        stand_in = CacheRecipe(**{f.name: getattr(coat, f.name) for f in dataclasses.fields(coat)})
        monkeypatch.setattr(fp8coat, "get_recipe", lambda r: stand_in if r == "coat" else coat)
    seen = []
    convert = fp8coat.convert
    monkeypatch.setattr(fp8coat, "convert", lambda model, recipe: seen.append(recipe) or convert(model, recipe))
    res = _run(tmp_path, "--rows", "fp8coat_best_cache,fp8coat_best")
    for r in res["rows"]:
        _check_ok(r)
    assert [r["cache_fp8_weights"] for r in res["rows"]] == [True, False, False]
    assert [r.cache_fp8_weights for r in seen] == [True, False, False]


def test_out_of_memory_moves_to_the_next_row(tmp_path, monkeypatch):
    step = llama7b.train_step

    def failing(tr, ids):
        if tr.row.name == "fp8coat_best" and ids.shape[0] == 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        if tr.row.name == "bf16amp_eager":  # as an allocation failing inside compilation arrives
            raise RuntimeError("backend compiler failed: simulated: CUDA out of memory")
        return step(tr, ids)

    monkeypatch.setattr(llama7b, "train_step", failing)
    res = _run(tmp_path, "--rows", "fp8coat_best,bf16amp_eager,fp8coat_exact",
               "--batches", "fp8coat_best:2,4;bf16amp_eager:2,4;fp8coat_exact:2")
    best, amp = _of(res, "fp8coat_best"), _of(res, "bf16amp_eager")
    assert len(best) == 1 and len(amp) == 1  # batch 4 not tried
    for r in best + amp:
        assert set(r) == set(llama7b.ROW_KEYS)
        assert (r["batch"], r["ok"], r["oom"], r["tok_s"]) == (2, False, True, None)
    # a plain out-of-memory run is a result, not an error; the wrapped one keeps its message
    assert list(res["errors"]) == ["bf16amp_eager@2"]
    _check_ok(_of(res, "fp8coat_exact")[0])
    assert [m["run"] for m in res["memory"]] == ["fp8coat_best@2", "bf16amp_eager@2", "fp8coat_exact@2"]


def test_profile_and_saved_bytes(tmp_path):
    res = _run(tmp_path, "--rows", "fp8coat_exact", "--profile", "fp8coat_best@4", "--profile", "fp8coat_exact@2",
               "--saved-bytes")
    assert [(r["row"], r["batch"]) for r in res["rows"]] == [("fp8coat_exact", 2), ("fp8coat_best", 4)]
    assert [(p["row"], p["batch"]) for p in res["profiles"]] == [("fp8coat_exact", 2), ("fp8coat_best", 4)]
    p = res["profiles"][1]
    assert (p["row"], p["batch"], p["device"]) == ("fp8coat_best", 4, "cpu")
    assert set(p["categories_ms"]) == set(llama7b.CATEGORIES)
    assert sum(p["categories_ms"].values()) == pytest.approx(p["kernel_sum_ms"])
    assert p["idle_gaps_ms"] == pytest.approx(p["wall_ms"] - p["busy_ms"])
    assert 0 < len(p["top"]) <= llama7b.PROFILE_TOP
    assert p["categories_ms"]["bf16_gemm"] > 0 and p["categories_ms"]["attention"] > 0  # aten::mm, sdpa on CPU
    s = res["saved_bytes"]
    assert (s["batch"], s["seq"], s["U_bytes"]) == (2, 32, 2 * 32 * 64 * 2)
    for rec in ("bf16", "coat"):
        r = s["recipes"][rec]
        assert r["total_bytes"] > 0 and sum(r["by_op"].values()) == r["total_bytes"]
    assert s["recipes"]["coat"]["total_bytes"] < s["recipes"]["bf16"]["total_bytes"]
    # coat holds no FP8 weight copies (the default); coat_cache saves the same and holds 1 byte per weight (+ 20 B)
    assert s["recipes"]["coat"]["weight_copy_bytes"] == 0
    assert s["recipes"]["coat_cache"]["total_bytes"] == s["recipes"]["coat"]["total_bytes"]
    assert s["recipes"]["coat_cache"]["weight_copy_bytes"] == 4 * (64 * 64 + 20) + 3 * (64 * 176 + 20)


def test_profile_categories_and_busy_time():
    kernels = {"_quant_transpose_kernel": "quantize", "_adamw_step_kernel": "adamw"}
    cases = {
        ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n", ()): "fp8_gemm",
        ("nvjet_tst_128x256_64x4", ("aten::_scaled_mm",)): "fp8_gemm",
        ("nvjet_hsh_128x256_64x4", ("aten::mm",)): "bf16_gemm",
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", ()): "bf16_gemm",
        ("flash_fwd_kernel", ("aten::_flash_attention_forward",)): "attention",
        ("fmha_cutlassB_bf16_aligned_64x64_k128", ()): "attention",
        ("_quant_transpose_kernel", ("fp8coat::linear",)): "fp8coat_triton",
        ("triton_poi_fused_add_mul_0", ()): "elementwise_other",
        ("Memcpy DtoD (Device -> Device)", ()): "elementwise_other",
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", ("nccl:_all_gather_base",)):
            "collectives",
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", ()): "collectives",
        ("c10d::allgather_", ()): "collectives",
    }
    for (name, parents), cat in cases.items():
        assert llama7b.categorize(name, parents, kernels)[0] == cat, name
    assert llama7b.categorize("_adamw_step_kernel", (), kernels) == ("fp8coat_triton", "adamw")
    assert llama7b.busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    items = [{"name": "_adamw_step_kernel", "parents": (), "us": 10.0, "start": 0.0, "end": 10.0},
             {"name": "nvjet_hsh", "parents": ("aten::mm",), "us": 6.0, "start": 4.0, "end": 10.0},
             {"name": "_adamw_step_kernel", "parents": (), "us": 2.0, "start": 30.0, "end": 32.0}]
    s = llama7b.summarize_items(items, wall_ms=0.05, fp8coat_kernels=kernels, device="cuda")
    assert s["kernel_sum_ms"] == pytest.approx(0.018) and s["busy_ms"] == pytest.approx(0.012)
    assert s["idle_gaps_ms"] == pytest.approx(0.038)
    assert s["categories_ms"]["fp8coat_triton"] == pytest.approx(0.012)
    assert s["fp8coat_triton_by_module_ms"] == {"adamw": pytest.approx(0.012)}
    assert [(t["name"], t["count"]) for t in s["top"]] == [("_adamw_step_kernel", 2), ("nvjet_hsh", 1)]
    assert set(llama7b.fp8coat_kernel_names().values()) >= {"quantize", "norm", "activation", "adamw"}


def test_profile_items_link_each_kernel_to_its_op():
    """Two launches of one kernel name from different ops land in different categories (fake profiler events)."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def op(id_, name, kernels):
        return NS(device_type=DeviceType.CPU, id=id_, name=name, kernels=[NS(name=k) for k in kernels])

    def kernel(name, link, start, end):
        return NS(device_type=DeviceType.CUDA, id=0, name=name, kernels=[], linked_correlation_id=link,
                  time_range=NS(start=start, end=end, elapsed_us=lambda: end - start))

    prof = NS(events=lambda: [op(7, "aten::_scaled_mm", ["nvjet_a"]), op(8, "aten::mm", ["nvjet_a"]),
                              kernel("nvjet_a", 7, 0.0, 30.0), kernel("nvjet_a", 8, 40.0, 50.0)])
    items = llama7b.profile_items(prof, cuda=True)
    assert [it["parents"] for it in items] == [("aten::_scaled_mm",), ("aten::mm",)]
    s = llama7b.summarize_items(items, wall_ms=0.1, fp8coat_kernels={}, device="cuda")
    assert s["categories_ms"]["fp8_gemm"] == pytest.approx(0.03)
    assert s["categories_ms"]["bf16_gemm"] == pytest.approx(0.01)
    assert s["top"][0]["category"] == "fp8_gemm" and s["top"][0]["ops"] == ["aten::_scaled_mm", "aten::mm"]


def test_build_in_dtype_without_fp32_copy():
    model = llama7b.build_llama(llama7b.DRY_SHAPE, 32, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in model.buffers())  # rotary inv_freq kept in fp32
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert 0.01 < w.std().item() < 0.03  # HF init (std 0.02), not zeros
    assert torch.get_default_dtype() == torch.float32


def test_compile_time_eager_rows(tmp_path, capsys):
    for library in ("fp8coat", "bf16"):
        assert compile_time.main(["--dry-run", "--eager", "--layers", "1", "--library", library,
                                  "--out", str(tmp_path)]) == 0
    rows = {lib: json.loads((tmp_path / f"compile_time-{tag}eager.json").read_text())["rows"][0]
            for lib, tag in (("fp8coat", ""), ("bf16", "bf16-"))}
    keys = {"layers", "recipe", "batch", "seq", "first_step_s", "two_steps_s", "later_step_ms", "graphs", "fp8coat"}
    for lib, r in rows.items():
        assert keys <= set(r) and (r["library"], r["compiled"], r["graphs"]) == (lib, False, 0)
        assert r["first_step_s"] >= r["step1_s"] and r["later_step_ms"] > 0
    assert (rows["fp8coat"]["recipe"], rows["bf16"]["recipe"]) == ("coat", "bf16")
    assert "eager first step" in capsys.readouterr().out
