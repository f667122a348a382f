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


@pytest.mark.parametrize("shapes", ["8192x", "0x16", "4096x14336x2", "big"])
def test_bad_shapes_are_refused_before_any_gpu_work(shapes, monkeypatch, capsys):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: pytest.fail("GPU work started"))
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        bench.main(["--shapes", shapes])
    assert f"--shapes={shapes!r}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_shapes_parse_as_k_by_n():
    assert bench._shapes("4096x14336,8192X28672") == [(4096, 14336), (8192, 28672)]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interrupted_bench_saves_the_rows_it_measured(stop, tmp_path, monkeypatch, capsys):
    """A bench stopped mid-table (Ctrl-C, or a timeout's SIGTERM) writes the rows measured so far, with their
    ratios, marks the run interrupted, exits non-zero and gives SIGTERM its old handler back."""
    import json
    import os
    import signal

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "no GPU (test)")
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 3000.0)
    seen = {}

    def linear(rows, copy_gbs, quick, energy, ms=None, shapes=None):
        seen.update(ms=ms, shapes=shapes)
        rows.append(dict(K=4096, N=14336, M=1, kernel="ours_int4_g128", us=20.0, torch_us=50.0, bytes=3e7,
                         graph_us=10.0, torch_graph_us=40.0))
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt
        rows.append(dict(K=4096, N=14336, M=4, kernel="never measured"))

    monkeypatch.setattr(bench, "run_linear", linear)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="interrupted .*1 rows saved"):
        bench.main(["--only", "linear,router", "--ms", "1", "--shapes", "4096x14336", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) is before
    assert seen == dict(ms=[1], shapes=[(4096, 14336)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert "interrupted" in saved["meta"]
    [row] = saved["rows"]
    assert row["ratio"] == pytest.approx(2.5) and row["graph_ratio"] == pytest.approx(4.0)
    assert row["bw_share"] == pytest.approx(3e7 / 20e-6 / 1e9 / 3000.0)
    assert (tmp_path / "bench.csv").read_text().splitlines()[1].count(",") == len(row) - 1
    assert "linear K=4096 N=14336 M=1 ours_int4_g128: us 20.0 torch_us 50.0" in capsys.readouterr().out
