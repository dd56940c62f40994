"""The benchmark's report arithmetic (pure functions; the benchmark itself
is run by `make bench`, not by the tests), and how it starts the process
its precision probe runs in."""

import os

from bench.__main__ import paired_row, row, speed_target


def test_row_ratio_and_target():
    assert row("x", 130.0, 100.0, 1.3)["met"] is True
    assert row("x", 129.0, 100.0, 1.3)["met"] is False
    assert row("x", 5.0, unit="s", at_most=4.0)["met"] is False


def test_only_the_default_precision_is_held_to_a_target():
    assert speed_target("bf16", "bf16") == 2.0
    assert speed_target("fp32", "fp32") == 1.3  # fp32 runs (and fp32+compile) where fp32 is the faster
    assert speed_target("fp32", "bf16") is None  # the fp32 path on a fast-bf16 CPU: shown, not judged
    assert row("x", 110.0, 100.0, speed_target("fp32", "bf16"))["met"] is None


def test_paired_row_is_the_mean_of_the_pairs_ratios():
    # The machine halved its speed between the pairs: each run is 1.4x the
    # plain loop next to it, though the second run is slower than the first
    # plain loop.
    pairs = [({"tokens_per_s": 200.0}, {"tokens_per_s": 280.0}),
             ({"tokens_per_s": 100.0}, {"tokens_per_s": 140.0})]
    result = paired_row("mini", "fp32", pairs, 1.3)
    assert abs(result["ratio"] - 1.4) < 1e-9
    assert result["met"] is True
    assert "1.40x, 1.40x" in result["note"]
    slower = paired_row("mini", "fp32", [({"tokens_per_s": 200.0}, {"tokens_per_s": 260.0}),
                                         ({"tokens_per_s": 100.0}, {"tokens_per_s": 110.0})], 1.4)
    assert abs(slower["ratio"] - 1.2) < 1e-9 and slower["met"] is False


def test_a_second_result_of_the_day_keeps_the_first(tmp_path):
    from bench.__main__ import unused_path

    first = tmp_path / "2026-12-04-vm-avx2.json"
    assert unused_path(first) == first
    first.write_text("{}")
    assert unused_path(first).name == "2026-12-04-vm-avx2-2.json"
    (tmp_path / "2026-12-04-vm-avx2-2.json").write_text("{}")
    assert unused_path(first).name == "2026-12-04-vm-avx2-3.json"


def test_pairs_on_both_sides_of_the_target_are_unsettled():
    from bench.__main__ import UNSETTLED, markdown

    pairs = [({"tokens_per_s": 100.0}, {"tokens_per_s": 140.0}),
             ({"tokens_per_s": 100.0}, {"tokens_per_s": 110.0})]
    result = paired_row("mini", "fp32", pairs, 1.3)
    assert result["met"] == UNSETTLED
    assert "| unsettled |" in markdown([result])
    assert "| NO |" in markdown([row("x", 1.0, 1.0, 1.3)])


def test_cpu_identity_names_the_processor_behind_the_model_name(tmp_path):
    from bench.__main__ import cpu_identity

    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
               "model name\t: AMD EPYC\nstepping\t: 2\ncpu MHz\t\t: 1996.2\nflags\t\t: fpu avx2 hypervisor\n"
               "bogomips\t: 3992.49\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
    (tmp_path / "index3").mkdir()
    for name, text in (("level", "3"), ("type", "Unified"), ("size", "8192K")):
        (tmp_path / "index3" / name).write_text(text + "\n")
    identity = cpu_identity(cpuinfo, tmp_path)
    assert identity["vendor"] == "AuthenticAMD" and identity["family"] == "23" and identity["model"] == "1"
    assert identity["stepping"] == "2" and identity["hypervisor"] is True
    assert identity["L3_unified"] == "8192K"


def test_steps_taking_turns_give_the_median_of_each_rounds_ratio():
    from bench.__main__ import turns_row
    from bench.train_speed import turns_summary

    # The machine slowed 2x after the first round: every round still reads
    # 1.5x.
    times = {"plain": [3.0, 6.0, 6.0], "gptdist": [2.0, 4.0, 4.0]}
    summary = turns_summary(times)
    assert summary["ratios"] == [1.5, 1.5, 1.5] and summary["ratio"] == 1.5
    result = turns_row("mini", summary)
    assert abs(result["ratio"] - 1.5) < 1e-9 and result["met"] is None
    assert "1.50-1.50x" in result["note"]
    uneven = turns_summary({"plain": [3.0, 3.0, 3.0], "gptdist": [1.0, 2.0, 3.0]})
    assert uneven["ratio"] == 1.5 and uneven["ratios"] == [3.0, 1.5, 1.0]


def test_cpu_kind_names_the_vendor_and_the_matmul_instructions():
    from bench.__main__ import cpu_kind

    def cpuinfo(vendor: str, flags: str) -> str:
        return f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\n"

    assert cpu_kind(cpuinfo("AuthenticAMD", "avx2 avx512f avx512_bf16")) == "amd-avx512bf16"
    assert cpu_kind(cpuinfo("GenuineIntel", "avx2 avx512f avx512_bf16")) == "intel-avx512bf16"
    assert cpu_kind(cpuinfo("GenuineIntel", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")) == "intel-amx"
    assert cpu_kind(cpuinfo("AuthenticAMD", "sse4_2 avx2 fma")) == "amd-avx2"
    assert cpu_kind(cpuinfo("SomeVendor", "sse4_2")) == "other"


def test_result_files_name_the_instruction_set_caps():
    from bench.__main__ import isa_caps_suffix

    assert isa_caps_suffix({}) == ""
    assert isa_caps_suffix({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) == "-onednn-avx512_core_bf16"
    assert isa_caps_suffix({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}) == "-mkl-avx2-aten-avx2"


def test_the_precision_probe_runs_in_a_process_started_as_a_worker_is():
    """The bench's probe row comes from a spawned process with the workers'
    malloc settings: the probe measures there, uncached, and the settings
    reach that process."""
    from bench import train_speed
    from gptdist.precision_probe import Matmul
    from gptdist.worker_contract import WORKER_MALLOC_ENV

    result = train_speed.in_child(train_speed.probe_precision_on_threads, [Matmul(64, 32, 48, 1)], 1,
                                  worker_malloc=True)
    assert result.precision in ("fp32", "bf16") and result.fp32_flops > 0 and result.bf16_flops > 0
    assert not result.cached
    assert train_speed.in_child(os.getenv, "MALLOC_ARENA_MAX", worker_malloc=True) == \
        WORKER_MALLOC_ENV["MALLOC_ARENA_MAX"]


def test_default_pairs_name_their_file_by_the_settings_changed():
    from bench.default_pairs import settings_suffix

    assert settings_suffix([]) == ""
    assert settings_suffix(["train.precision=fp32"]) == "-precision-fp32"
    assert settings_suffix(["train.precision=fp32", "train.attention=sdpa"]) == "-precision-fp32-attention-sdpa"
    assert settings_suffix(["data.path=/a b/c"]) == "-path-_a_b_c"
