"""`mmpretrain bench train` on CPU: the real Trainer timed, and the OpenCLIP comparison's skip."""
from __future__ import annotations

import builtins
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmpretrain.engine.bench as engine_bench
from helpers import REPO, clean_env, free_port
from mmpretrain.config.load import load_config
from mmpretrain.engine.bench import (PROFILE_STEPS, SKIP_MESSAGE, open_clip_name,
                                     open_clip_problem)
from mmpretrain.engine.bench_format import format_report
from mmpretrain.engine.profile import family
from mmpretrain.logging.flops import PEAK_TFLOPS_ENV, train_flops_per_sample

# open_clip made unimportable whether or not it is installed (None in sys.modules).
BLOCKED_RUN = ("import sys; sys.modules['open_clip'] = None; from mmpretrain.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
ARGS = ["bench", "train", "--model", "tiny", "--batch", "8", "--steps", "3", "--warmup", "1",
        "--compare", "open_clip", "--json", "--sync-each-step", "optim.lr=0.0005"]


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def tiny_run(profile_dir: Path) -> subprocess.CompletedProcess:
    env = clean_env()
    env.pop(PEAK_TFLOPS_ENV, None)
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, *ARGS, "--profile",
                           str(profile_dir)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_tiny_cpu_run_reports_sane_numbers(tiny_run: subprocess.CompletedProcess) -> None:
    assert tiny_run.returncode == 0, tiny_run.stderr[-4000:]
    report = json.loads(tiny_run.stdout.strip().splitlines()[-1])
    ours = report["mmpretrain"]
    assert ours["device_type"] == "cpu" and ours["world_size"] == 1
    assert ours["steps"] == 3 and ours["global_batch"] == 8
    assert ours["samples_per_s"] > 0 and ours["tflops_per_s"] > 0
    assert ours["mfu"] is None and ours["peak_tflops"] is None  # no known CPU peak
    flops = train_flops_per_sample(load_config(None, ["model.size=tiny"]).model)
    assert ours["train_flops_per_sample"] == flops
    assert ours["tflops_per_s"] == pytest.approx(flops * ours["samples_per_s"] / 1e12)
    assert ours["step_time_s"] == pytest.approx(8 / ours["samples_per_s"])
    assert 0 <= ours["data_wait_frac"] < 1
    assert ours["params"] > 1_000_000 and ours["peak_mem_gb"] > 0
    assert ours["host_peak_gb"] > 0 and ours["peak_reserved_gb"] is None  # no CUDA allocator
    assert 0 < ours["predicted_peak_gb"] < 1 and ours["predicted_host_gb"] == 0  # no offload
    assert ours["gpu_memory_limit_gb"] is None
    assert ours["precompile"] is None  # only with the Triton attention on CUDA
    assert ours["loss"] > 0
    assert ours["versions"]["torch"] and ours["versions"]["deepspeed"]
    assert ours["sync_each_step"] and ours["overrides"] == ["optim.lr=0.0005"]
    early = [line for line in tiny_run.stderr.splitlines() if line.startswith("mmpretrain: ")]
    assert len(early) == 1 and "samples/s" in early[0]  # printed before OpenCLIP would start
    assert json.loads(early[0].split("(JSON: ", 1)[1][:-1]) == ours
    table = format_report(report)
    assert "n/a (unknown peak)" in table and "samples/s" in table
    assert "optim.lr=0.0005, device synced before each step" in table
    assert "predicted (bench memory)" in table and "host peak RSS" in table


def test_two_ranks_finish_with_the_memory_prediction(tmp_path: Path) -> None:
    """torchrun, 2 ranks on CPU, profiled: only rank 0 measures the memory plan, and the
    plan's forward must not gather across ranks (its loss once waited in an all-gather that
    rank 1, waiting in the barrier after the timed steps, never joined: the run hung); each
    rank writes its own trace (both once wrote, and read back, the same file)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "mmpretrain.cli", "bench", "train",
         "--model", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--json",
         "--profile", str(tmp_path)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = json.loads(proc.stdout.strip().splitlines()[-1])["mmpretrain"]
    assert ours["world_size"] == 2 and ours["global_batch"] == 8 and ours["steps"] == 2
    assert ours["samples_per_s"] > 0 and 0 < ours["predicted_peak_gb"] < 1
    assert ours["profile"]["trace"] == str(tmp_path / "mmpretrain.rank0.trace.json.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"mmpretrain.rank{r}.trace.json.gz" for r in (0, 1)]


def test_profile_reports_where_the_time_goes(tiny_run: subprocess.CompletedProcess,
                                             profile_dir: Path) -> None:
    """--profile: PROFILE_STEPS more steps under torch.profiler after the timed ones (the
    schedule covers them), a summary in the record, top ops on stderr, a gzipped trace."""
    assert tiny_run.returncode == 0, tiny_run.stderr[-4000:]
    prof = json.loads(tiny_run.stdout.strip().splitlines()[-1])["mmpretrain"]["profile"]
    assert prof["steps"] == PROFILE_STEPS and prof["wall_ms_per_step"] > 0
    assert prof["aten_ops_per_step"] > 100  # a tiny CLIP's step dispatches hundreds at least
    assert prof["device_busy_ms_per_step"] == 0 and prof["families_ms_per_step"] == {}  # CPU
    assert prof["trace"] == str(profile_dir / "mmpretrain.trace.json.gz")
    events = json.load(gzip.open(prof["trace"]))["traceEvents"]
    assert any(e.get("name") in ("aten::mm", "aten::addmm") for e in events)
    assert "== profile mmpretrain: " in tiny_run.stderr and "Self CPU" in tiny_run.stderr
    phases = prof["timeline"]["phases_per_step"]  # the trainer's marked phases, on the host
    assert set(phases) == {"forward", "backward", "optimizer"}, phases
    assert all(row["host_ms"] > 0 and row["kernels"] == 0 for row in phases.values())
    assert prof["wall_ms_per_step"] >= sum(row["host_ms"] for row in phases.values())
    assert "== timeline mmpretrain, per step:" in tiny_run.stderr


@pytest.mark.parametrize("name, fam", [
    ("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1>", "matmul"),
    ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_splitK_NTN", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("_attn_bwd_fused", "attention"),
    ("triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_sum_view_1",
     "norm"),
    ("triton_poi_fused_gelu_gelu_backward_view_0", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", "copy"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, MaxOps",
     "reduction"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("something_new", "other")])
def test_profile_kernel_families(name: str, fam: str) -> None:
    """Kernel names seen on the H200 (cuBLAS, cuDNN, Inductor, ATen, ours) land in their family."""
    assert family(name) == fam


def test_out_of_memory_is_a_record(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    """A run that does not fit ends as a report saying so (exit status 3), not a traceback,
    and OpenCLIP is not started."""
    import mmpretrain.engine.trainer as trainer_mod
    from mmpretrain.cli import main

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(trainer_mod, "Trainer", oom)
    monkeypatch.setattr(engine_bench, "bench_open_clip", lambda *a: pytest.fail("ran OpenCLIP"))
    monkeypatch.setattr(engine_bench, "open_clip_problem", lambda: None)
    rc = main(["bench", "train", "--model", "vit_b16", "--batch", "4096", "--zero", "3",
               "--compare", "open_clip", "engine.offload_optimizer=true"])
    out = capsys.readouterr().out
    assert rc == 3
    assert "vit_b16, batch 4096, ZeRO 3, engine.offload_optimizer=true: out of device memory" \
        in out and out.rstrip().endswith("Tried to allocate 2.00 GiB")
    rc = main(["bench", "train", "--model", "tiny", "--json"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rc == 3 and record["mmpretrain"]["oom"] and record["open_clip"] is None


def test_compare_without_open_clip_skips(tiny_run: subprocess.CompletedProcess) -> None:
    assert tiny_run.returncode == 0, tiny_run.stderr[-4000:]
    assert "open-clip-torch is not installed" in tiny_run.stderr
    assert "mmpretrain[bench]" in tiny_run.stderr
    report = json.loads(tiny_run.stdout.strip().splitlines()[-1])
    assert report["open_clip"] is None and report["ratio_samples_per_s"] is None
    assert report["notes"] == [SKIP_MESSAGE]


def test_open_clip_names() -> None:
    assert open_clip_name("vit_b16") == "ViT-B-16"
    assert open_clip_name("vit_l14") == "ViT-L-14"
    with pytest.raises(ValueError, match="--model 'tiny'"):
        open_clip_name("tiny")


def test_open_clip_that_fails_to_import_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def broken(name: str, *args, **kwargs):
        if name == "open_clip":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert "RuntimeError: operator torchvision::nms" in open_clip_problem()
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert open_clip_problem() == SKIP_MESSAGE


def test_table_with_both_and_a_known_peak() -> None:
    ours = {"model": "vit_b16", "batch_per_rank": 256, "world_size": 1, "data": "synthetic",
            "zero_stage": 1, "precision": "bf16", "steps": 30, "warmup": 10,
            "device": "GPU X", "peak_tflops": 100.0, "versions": {"torch": "t"},
            "samples_per_s": 300.0, "step_time_s": 256 / 300, "tflops_per_s": 40.0,
            "mfu": 0.4, "peak_mem_gb": 10.0, "data_wait_frac": 0.01, "params": 150e6}
    theirs = {**ours, "model": "ViT-B-16", "precision": "amp_bf16", "compiled": True,
              "samples_per_s": 200.0, "mfu": 0.2667, "versions": {"open_clip": "3.3.0"}}
    text = format_report({"mmpretrain": ours, "open_clip": theirs, "ratio_samples_per_s": 1.5,
                          "notes": []})
    assert "40.0%" in text and "26.7%" in text and "1.50x" in text
    assert "open_clip 3.3.0" in text and "torch.compile" in text


# ---- the host twin (engine/host_twin.py) ------------------------------------------------------
@pytest.mark.parametrize("size", ["vit_b16", "vit_l14", "coca_vit_b32"])
def test_host_twin_keeps_every_parameter_tensor(size: str) -> None:
    """The twin has the full model's parameter tensors (names, count), only narrower: the
    same hooks, optimizer groups and per-tensor host work per step."""
    from mmpretrain.engine.host_twin import twin_overrides
    from mmpretrain.model import build_model

    def params(*overrides: str) -> dict[str, int]:
        cfg = load_config(None, [f"model.size={size}", *overrides])
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.loss.kind)
        return {n: p.numel() for n, p in model.named_parameters()}

    full, twin = params(), params(*twin_overrides(size))
    assert list(twin) == list(full) and len(full) > 300
    assert sum(twin.values()) < sum(full.values()) / 100  # arithmetic negligible
    with pytest.raises(ValueError, match="named model size"):
        twin_overrides("my_size")


def test_open_clip_twin_config_and_registration() -> None:
    """OpenCLIP's config cut the same way (layers kept), added through its public
    `add_model_config` as a JSON file it reads at once."""
    from mmpretrain.engine.host_twin import open_clip_twin_config, register_open_clip_twin

    arch = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                         "layers": 12}}
    twin = open_clip_twin_config(arch)
    assert twin == {"embed_dim": 32,
                    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32,  # 2 x 2 patches
                                   "patch_size": 16, "head_width": 32},
                    "text_cfg": {"context_length": 8, "vocab_size": 512, "width": 32,
                                 "heads": 1, "layers": 12}}
    assert arch["vision_cfg"]["width"] == 768  # the original is left alone

    class FakeOpenClip:
        added: dict = {}

        def get_model_config(self, name: str) -> dict:
            return arch

        def add_model_config(self, path: Path) -> None:
            self.added[Path(path).stem] = json.loads(Path(path).read_text())

    fake = FakeOpenClip()
    assert register_open_clip_twin(fake, "ViT-B-16") == "ViT-B-16-host-twin"
    assert fake.added == {"ViT-B-16-host-twin": twin}


def test_host_twin_run_times_the_host(tmp_path: Path) -> None:
    """--host-twin on CPU: the narrow model through the real Trainer, timed in chunks (median),
    the table says so; the parameter count is the twin's."""
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "bench", "train", "--model",
                           "vit_b16", "--batch", "2", "--steps", "5", "--warmup", "1",
                           "--host-twin", "--json"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = report["mmpretrain"]
    assert report["options"]["host_twin"] is True
    assert 100_000 < ours["params"] < 1_000_000 and ours["step_time_s"] > 0
    assert "HOST TWIN" in format_report(report)


# ---- interleaved host A/B (engine/host_ab.py) -------------------------------------------------
def test_host_ab_ratios_are_per_round() -> None:
    """Each ratio is the median over rounds of the two times in the same round, so a round
    where the machine ran at half speed leaves the ratios alone."""
    from mmpretrain.engine.host_ab import HostAbOptions, _report, format_host_ab

    times = {"a": [10.0, 20.0, 40.0], "b": [15.0, 20.0, 60.0], "open_clip": [5.0, 10.0, 20.0]}
    kernels = {"a": 1308, "b": 0, "open_clip": 1335}
    report = _report(HostAbOptions(rounds=3), times, kernels, torch.device("cpu"))
    rows = {r["name"]: r for r in report["participants"]}
    assert [r["inductor_kernels"] for r in rows.values()] == [1308, 0, 1335]
    assert list(rows) == ["a", "b", "open_clip"]
    assert rows["a"]["vs_first"] == 1.0 and rows["b"]["vs_first"] == 1.5
    assert rows["a"]["vs_open_clip"] == 2.0 and rows["b"]["vs_open_clip"] == 3.0
    assert rows["b"]["median_ms"] == 20.0 and rows["b"]["rounds_ms"] == [15.0, 20.0, 60.0]
    table = format_host_ab(report)
    assert "1.50x" in table and "3.00x" in table and "1335" in table and table.count("\n") == 5


def test_host_ab_counts_each_participants_inductor_kernels() -> None:
    """Kernels Inductor generates while a participant runs (its first calls compile) are
    counted for that participant only, across warm-up and rounds."""
    from torch._inductor import metrics

    from mmpretrain.engine.host_ab import HostAbOptions, _rounds

    calls = {"compiled": 0, "eager": 0}

    def make(name: str, compiles: int):  # noqa: ANN202
        def run(n: int) -> None:
            calls[name] += 1
            if calls[name] <= 2:  # warm-up and the first round compile
                metrics.generated_kernel_count += compiles
        return run

    times, kernels = _rounds(HostAbOptions(rounds=3, steps=1, warmup=1), torch.device("cpu"),
                             {"compiled": make("compiled", 7), "eager": make("eager", 0)})
    assert kernels == {"compiled": 14, "eager": 0}
    assert all(len(ms) == 3 for ms in times.values())


def test_host_ab_runs_variants_in_rounds() -> None:
    """Two variants of the ViT-B/16 host twin through the real Trainer in one process; without
    OpenCLIP installed, `--compare open_clip` is an error (a comparison was asked for)."""
    run = [sys.executable, "-c", BLOCKED_RUN, "bench", "host-ab", "--model", "vit_b16",
           "--rounds", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32"]
    proc = subprocess.run([*run, "--variant", "optim.grad_clip=1.0", "--variant",
                           "optim.grad_clip=0", "--json"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = report["participants"]
    assert [r["name"] for r in rows] == ["optim.grad_clip=1.0", "optim.grad_clip=0"]
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_open_clip"] is None
    assert [r["inductor_kernels"] for r in rows] == [0, 0]  # eager: nothing compiled
    assert all(len(r["rounds_ms"]) == 2 and min(r["rounds_ms"]) > 0 for r in rows)
    proc = subprocess.run([*run, "--compare", "open_clip"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "open-clip-torch" in proc.stderr, proc.stderr[-2000:]


def test_host_ab_on_two_ranks_reports_once() -> None:
    """torchrun, 2 ranks: every rank times the same interleaved rounds (their collectives
    match), rank 0 alone prints the report, which names the world size; OpenCLIP's
    one-process twin is refused there by name."""
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(free_port()), "-m", "mmpretrain.cli", "bench", "host-ab",
             "--model", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1", *extra],
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=150)

    proc = run("--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, proc.stdout[-2000:]
    report = json.loads(reports[0])
    assert report["world_size"] == 2 and report["rank"] == 0
    assert [len(p["rounds_ms"]) for p in report["participants"]] == [2]
    refused = run("--compare", "open_clip")
    assert refused.returncode != 0 and "run it on one rank" in refused.stderr, refused.stderr
