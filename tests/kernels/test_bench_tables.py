"""The kernel bench's table of captured decode calls (the GPU numbers themselves need the device)."""
import pytest

from ttha.kernels import bench


def test_profile_rows_print_replay_gap_and_each_kernel():
    rows = [dict(table="profile", K=8192, N=28672, M=1, kernel="ours_int4_g128", graph_us=52.04,
                 kernels={"_x_pairs_kernel": 2.0, "_gemv_kernel": 49.43, "_splitk_reduce_kernel": 20.2}, gap_us=2.61),
            dict(table="profile", K=4096, N=14336, M=16, kernel="bf16_linear", graph_us=42.5,
                 kernels={"nvjet_sm90_tst_64x16_64x16_2x1_v_bz_TNT": 42.1}, gap_us=0.4)]
    lines = bench.fmt_table(rows).splitlines()
    assert "captured decode calls" in lines[1]
    ours = next(line for line in lines if "ours_int4_g128" in line).split()
    assert ours[:5] == ["8192x28672", "1", "ours_int4_g128", "52.0", "2.6"]
    assert "_gemv_kernel 49.4," in " ".join(ours) and "_splitk_reduce_kernel 20.2" in " ".join(ours)
    # long kernel names are cut to 28 characters, so the row stays readable
    assert "nvjet_sm90_tst_64x16_64x16_2 42.1" in next(line for line in lines if "bf16_linear" in line)


def test_bench_refuses_to_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--only", "profile"])


@pytest.mark.parametrize("ms", ["1,x", "0,16"])
def test_bad_ms_is_refused_before_any_gpu_work(ms, monkeypatch, capsys):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: pytest.fail("GPU work started"))
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        bench.main(["--ms", ms])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--ms={ms!r}" in err


def test_ms_parses_once_into_integers():
    assert bench._ms("1,16,") == [1, 16] and bench._ms("") == []
