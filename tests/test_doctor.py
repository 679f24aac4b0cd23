"""`memoryformer doctor` prints the environment, one fact a line, without building or downloading anything."""

from memoryformer.cli import main as cli_main


def test_doctor_names_versions_cpu_kernels_and_gpu(capsys, monkeypatch):
    monkeypatch.setenv("MEMORYFORMER_CPU_KERNEL", "0")
    cli_main(["doctor"])
    out = capsys.readouterr().out.splitlines()
    text = "\n".join(out)
    assert out[0].startswith("python 3.")
    assert any(line.startswith("torch 2.") for line in out), text
    assert "CPU kernels: off (MEMORYFORMER_CPU_KERNEL=0)" in text
    assert any(line.startswith("CPU: ") and "logical cores" in line for line in out), text
    assert any(line.startswith("CUDA: ") for line in out), text
    assert len(out) < 40  # one screen
